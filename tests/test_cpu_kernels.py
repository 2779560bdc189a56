"""The CPU path (C kernels built by kernels/native.py) against the PyTorch twins.

The decode must be the twin's bytes on every shape, blocksize, code book, storage dtype and output
dtype (odd element counts, partial last blocks, shapes smaller than one SIMD step); products may
differ from the twin's only by the matmul's summation order, so they are compared against fp64 math
on the same decoded W with the tolerances of test_kernels.py. Every test runs with 1 or 2 threads.
"""
import warnings

import pytest
import torch

import qlora
from qlora.kernels import backend, native, selfcheck, set_backend
from qlora.kernels.nf4 import cpu as nf4_cpu
from qlora.kernels.nf4 import ops, reference
from helpers import rel_err

needs_compiler = pytest.mark.skipif(not nf4_cpu.available(), reason="no C compiler: the CPU path is the twin")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantized(shape, quant_type="nf4", blocksize=64, double_quant=True, storage=torch.uint8, scale=0.05):
    w = torch.randn(shape) * scale
    packed, state = qlora.quantize_4bit(w, quant_type, blocksize, double_quant, quant_storage=storage)
    return state.packed_view(packed)


def same_bytes(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(
        got.contiguous().view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8))


@needs_compiler
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 97), (64, 64), (5, 1000), (130, 257)])
@pytest.mark.parametrize("quant_type,blocksize,double_quant", [
    ("nf4", 64, True), ("nf4", 64, False), ("fp4", 32, True), ("fp4", 128, False), ("nf4", 4096, True)])
def test_decode_is_the_twins_bytes(threads, shape, quant_type, blocksize, double_quant):
    weight = quantized(shape, quant_type, blocksize, double_quant)
    for dtype in DTYPES:
        assert same_bytes(nf4_cpu.dequantize_4bit_cpu(weight, dtype), reference.dequantize_4bit_torch(weight, dtype))


@needs_compiler
def test_decode_large_weight_split_over_threads(threads):
    # 1200 x 1000 = 18750 blocks: several threads' ranges, a partial last range, the SIMD loop and its tail.
    weight = quantized((1200, 1000), blocksize=64)
    for dtype in DTYPES:
        assert same_bytes(nf4_cpu.dequantize_4bit_cpu(weight, dtype), reference.dequantize_4bit_torch(weight, dtype))


@needs_compiler
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_reinterprets_float_storage(storage):
    # Random bytes include NaN bit patterns of the storage dtype: they must reach the decode as bytes.
    weight = quantized((16, 64), storage=storage)
    raw = torch.randint(0, 256, (16 * 64 // 2,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    weight = weight._replace(packed=raw.view(storage).view(-1, 1))
    assert same_bytes(nf4_cpu.dequantize_4bit_cpu(weight, torch.float32), reference.dequantize_4bit_torch(weight, torch.float32))


@needs_compiler
def test_decode_extreme_scales_round_like_torch():
    # Scales near the fp32 limits: bf16/fp16 overflow to inf, subnormal products, round-half-even ties.
    weight = quantized((8, 64), double_quant=False)
    absmax = torch.tensor([3e38, 1e-39, 65504.0, 1e-6, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 7e-8, 2.0] * 1, dtype=torch.float32)
    weight = weight._replace(absmax=absmax)
    for dtype in DTYPES:
        assert same_bytes(nf4_cpu.dequantize_4bit_cpu(weight, dtype), reference.dequantize_4bit_torch(weight, dtype))


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,out_features,in_features", [(1, 33, 64), (7, 96, 130), (40, 64, 256)])
def test_products_forward_and_grad_input(threads, dtype, m, out_features, in_features):
    set_backend("cpu")
    try:
        weight = quantized((out_features, in_features), "nf4", 64, True)
        w = reference.dequantize_4bit_torch(weight, dtype).double()
        x = torch.randn(m, in_features).to(dtype).requires_grad_()
        bias = torch.randn(out_features).to(dtype).requires_grad_()
        y = qlora.kernels.linear_4bit(x, weight, bias)
        grad = torch.randn(m, out_features).to(dtype)
        y.backward(grad)
        assert y.dtype == dtype and x.grad.dtype == dtype
        assert rel_err(y, x.detach().double() @ w.T + bias.detach().double()) < TOLERANCE[dtype]
        assert rel_err(x.grad, grad.double() @ w) < TOLERANCE[dtype]
        assert torch.allclose(bias.grad.double(), grad.double().sum(0), rtol=TOLERANCE[dtype], atol=1e-3)
    finally:
        set_backend(None)


@needs_compiler
def test_auto_backend_takes_the_cpu_path_and_torch_forces_the_twin(monkeypatch):
    calls = []
    real = nf4_cpu.dequantize_4bit_cpu
    monkeypatch.setattr(nf4_cpu, "dequantize_4bit_cpu", lambda *a: calls.append(1) or real(*a))
    weight = quantized((8, 64))
    monkeypatch.delenv("QLORA_BACKEND", raising=False)
    ops.dequantize(weight, torch.float32)
    ops.matmul(torch.randn(2, 64), weight, None, True)
    assert len(calls) == 2
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    ops.dequantize(weight, torch.float32)
    ops.matmul(torch.randn(2, 64), weight, None, True)
    assert len(calls) == 2


def test_no_compiler_falls_back_to_the_twin_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "_failures", {})
    native.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not nf4_cpu.available() and not nf4_cpu.available()
        assert len([w for w in caught if "no C compiler found" in str(w.message)]) == 1
        weight = quantized((8, 64))
        monkeypatch.delenv("QLORA_BACKEND", raising=False)
        assert same_bytes(ops.dequantize(weight, torch.bfloat16), reference.dequantize_4bit_torch(weight, torch.bfloat16))
        monkeypatch.setenv("QLORA_BACKEND", "cpu")
        with pytest.raises(backend.BackendError, match="QLORA_BACKEND=cpu but the CPU kernels cannot be built.*no C compiler"):
            ops.dequantize(weight, torch.float32)
    finally:
        native.load.cache_clear()


def test_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C;\n")
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "cache"))
    if native.compiler() is None:
        pytest.skip("no C compiler")
    with pytest.warns(RuntimeWarning, match="building broken.c with .* failed"):
        assert native.load(bad) is None


@needs_compiler
def test_cpu_self_check_passes_and_catches_a_wrong_decode(monkeypatch):
    assert selfcheck.CHECKS["cpu_dequantize"](torch.device("cpu"), torch.bfloat16)[0]
    real = nf4_cpu.dequantize_4bit_cpu
    monkeypatch.setattr(nf4_cpu, "dequantize_4bit_cpu", lambda w, d: real(w, d).neg())
    ok, detail = selfcheck.CHECKS["cpu_dequantize"](torch.device("cpu"), torch.bfloat16)
    assert not ok and "differ from the reference" in detail


# ---- LLM.int8 and GPTQ -----------------------------------------------------------------------------
from qlora.kernels.gptq import cpu as gptq_cpu  # noqa: E402
from qlora.kernels.gptq import ops as gptq_ops  # noqa: E402
from qlora.kernels.gptq.format import PackedGPTQ, pack  # noqa: E402
from qlora.kernels.gptq.reference import dequantize_gptq_torch, matmul_gptq_torch  # noqa: E402
from qlora.kernels.int8 import cpu as int8_cpu  # noqa: E402
from qlora.kernels.int8 import ops as int8_ops  # noqa: E402
from qlora.kernels.int8 import reference as int8_reference  # noqa: E402


def gptq_weight(n, k, bits, group_size, act_order, zero_offset=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 2 ** bits, (k, n), generator=g)
    z = torch.randint(0, 2 ** bits - zero_offset, (groups, n), generator=g)
    g_idx = (torch.arange(k) // group_size).to(torch.int32)
    perm = None
    if act_order:
        perm = torch.randperm(k, generator=g)
        g_idx = g_idx[perm].contiguous()
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).half()
    return PackedGPTQ(pack(q, bits, 0), pack(z, bits, 1), scales, g_idx, perm, bits, zero_offset, (n, k))


@needs_compiler
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (37, 97), (130, 257)])
def test_int8_decode_is_the_twins_bytes(threads, rows, cols):
    g = torch.Generator().manual_seed(rows)
    codes = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
    scb = torch.rand(rows, generator=g) * 5
    scb[0] = 0.0  # an all-zero row's SCB
    for dtype in DTYPES:
        assert same_bytes(int8_cpu.int8_dequantize_cpu(codes, scb, dtype), int8_reference.int8_dequantize_torch(codes, scb, dtype))


@needs_compiler
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_forward_same_integers_and_backward(threads, m, dtype):
    g = torch.Generator().manual_seed(m)
    codes = torch.randint(-127, 128, (48, 160), dtype=torch.int8, generator=g)
    scb = torch.rand(48, generator=g) * 2 + 0.01
    a = torch.randn(m, 160, generator=g)
    a[0, 3] = 9.0  # one outlier column
    a = a.to(dtype).requires_grad_()
    bias = torch.randn(48, generator=g).to(dtype)
    set_backend("cpu")
    try:
        got = int8_ops.linear_int8(a, codes, scb, bias, 6.0)
        got.backward(torch.ones_like(got))
    finally:
        set_backend(None)
    # The int8 product is exact integers on both paths and the scaling is the twin's: the same bytes.
    assert same_bytes(got.detach(), int8_reference.int8_linear_torch(a.detach(), codes, scb, bias, 6.0))
    want_grad = torch.ones(m, 48, dtype=torch.float64) @ int8_reference.int8_dequantize_torch(codes, scb, dtype).double()
    assert rel_err(a.grad, want_grad) < TOLERANCE[dtype]


@needs_compiler
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("n,k,group_size", [(8, 32, 32), (24, 96, 32), (40, 160, 64)])
def test_gptq_decode_is_the_twins_bytes(threads, bits, act_order, n, k, group_size):
    weight = gptq_weight(n, k, bits, group_size, act_order)
    for dtype in DTYPES:
        assert same_bytes(gptq_cpu.dequantize_gptq_cpu(weight, dtype), dequantize_gptq_torch(weight, dtype))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_products_forward_and_backward(dtype, act_order):
    weight = gptq_weight(40, 160, 4, 32, act_order, zero_offset=0)
    w = dequantize_gptq_torch(weight, dtype).double()
    x = torch.randn(9, 160).to(dtype)
    grad = torch.randn(9, 40).to(dtype)
    bias = torch.randn(40).to(dtype)
    set_backend("cpu")
    try:
        forward = gptq_ops.matmul(x, weight, bias, True)
        backward = gptq_ops.matmul(grad, weight, None, False)
    finally:
        set_backend(None)
    assert rel_err(forward, x.double() @ w.T + bias.double()) < TOLERANCE[dtype]
    assert rel_err(backward, grad.double() @ w) < TOLERANCE[dtype]


def test_gptq_three_bits_stays_on_the_twin(monkeypatch):
    monkeypatch.setattr(gptq_cpu, "dequantize_gptq_cpu", lambda *a: pytest.fail("3 bits reached the C decode"))
    weight = gptq_weight(8, 64, 3, 32, False)
    assert same_bytes(gptq_ops.dequantize(weight, torch.float32), dequantize_gptq_torch(weight, torch.float32))
    assert rel_err(gptq_ops.matmul(torch.randn(2, 64), weight, None, True),
                   matmul_gptq_torch(torch.randn(2, 64), weight, None, True)) < 10  # ran, on the twin


def test_thread_ranges_in_a_forked_child_after_the_parent_used_its_pool():
    # A forked child inherits the parent's pool object but not its threads: work submitted there would
    # wait forever. (Plain Python work in the child: torch's OpenMP is not fork-safe by itself.)
    import os
    import signal

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        native.parallel_ranges(lambda first, last: seen.append((first, last)), 10, 1)
        assert sorted(seen) == [(0, 5), (5, 10)]
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a hang fails the test instead of stalling the suite
            child = []
            native.parallel_ranges(lambda first, last: child.append((first, last)), 10, 1)
            os._exit(0 if sorted(child) == [(0, 5), (5, 10)] else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(before)


class _SeenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that reaches the dispatcher, and runs it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("transpose_weight", [True, False])
def test_eager_cpu_calls_skip_the_dispatcher_with_the_same_result(transpose_weight):
    # Eager CPU calls run the op's body directly (backend.call_directly); a dispatch mode (make_fx,
    # FakeTensorMode, FlopCounterMode) must still see qlora::matmul_4bit whole, with the same product.
    weight = quantized((48, 80))
    a = torch.randn(5, 80 if transpose_weight else 48, dtype=torch.bfloat16)
    direct = ops.matmul(a, weight, None, transpose_weight)
    with _SeenOps() as mode:
        dispatched = ops.matmul(a, weight, None, transpose_weight)
    assert "qlora.matmul_4bit.default" in mode.seen
    assert torch.equal(direct, dispatched)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
        ops.matmul(a, weight, None, transpose_weight)
    names = {event.name for event in profiled.events()}
    assert "aten::mm" in names and "qlora::matmul_4bit" not in names  # the body ran, the dispatcher did not
    assert backend.call_directly(a) and not backend.call_directly(a.to("meta"))


def test_eager_direct_call_keeps_the_ops_checks():
    weight = quantized((48, 80))
    with pytest.raises(ValueError, match="path must be one of"):
        ops.matmul(torch.randn(2, 80), weight, None, True, path="bogus")
    with pytest.raises((ValueError, RuntimeError), match="80"):
        ops.matmul(torch.randn(2, 81), weight, None, True)
