"""The grouped 4-bit kernel of mixture-of-experts layers (kernels/moe/): the expert stack's layout, the
PyTorch twin against an fp64 reference built from kernels/nf4's decode of each expert, the Triton kernel
against the twin in the interpreter (fp16/fp32: the interpreter has no bf16 arithmetic), and the kernel
compiled for sm_80/86/89/90 without spills.

As in test_kernels.py, the interpreter is chosen when a kernel is decorated, so the `interp_` tests run
in a child pytest with TRITON_INTERPRET=1 started by `test_moe_kernels_in_interpreter`.
"""
import math
import os

import pytest
import torch

import qlora
from qlora.kernels import set_backend
from qlora.kernels.backend import BackendError
from qlora.kernels.moe.ops import grouped_linear_4bit
from qlora.kernels.moe.packed import PackedExperts4bit
from qlora.kernels.moe.reference import dequantize_experts_torch, grouped_matmul_torch
from qlora.kernels.nf4.reference import dequantize_4bit_torch
from helpers import bnb_functional, rel_err, requires_bnb

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child")
parent_only = pytest.mark.skipif(INTERPRETED, reason="runs in the parent process")


def expert_stack(num_experts, out_features, in_features, quant_type="nf4", blocksize=64, double_quant=True,
                 quant_storage=torch.uint8, seed=0):
    """E experts, each quantized on its own (what bitsandbytes' quantize_4bit gives per expert), stacked;
    and the Packed4bit of each."""
    generator = torch.Generator().manual_seed(seed)
    experts = []
    for _ in range(num_experts):
        w = torch.randn(out_features, in_features, generator=generator) * 0.05
        packed, state = qlora.quantize_4bit(w, quant_type, blocksize, double_quant, quant_storage)
        experts.append(state.packed_view(packed))
    return PackedExperts4bit.stack(experts), experts


def sorted_rows(counts, features, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), features, generator=generator).to(dtype)


def reference_fp64(a, experts, counts, transpose_weight):
    """Each expert decoded by kernels/nf4 (fp32, exact), products of a's values in fp64."""
    out, start = [], 0
    for e, count in enumerate(counts):
        w = dequantize_4bit_torch(experts.expert(e), torch.float32).double()
        rows = a[start:start + count].double()
        out.append(rows @ (w.T if transpose_weight else w))
        start += count
    return torch.cat(out)


def product_tolerance(dtype, reduction):
    # Operands rounded to dtype (W once, as the dense layer does), products summed in fp32 and rounded
    # once to dtype: the relative error grows like eps(dtype) * sqrt(reduction).
    return 4 * torch.finfo(dtype).eps * math.sqrt(reduction)


COUNTS = [3, 0, 1, 21, 0, 6]  # experts without tokens, with one row, and one over two 16-row tiles


# ---- the layout ------------------------------------------------------------------------------------
@parent_only
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_each_expert_is_its_own_packed4bit(quant_storage):
    stack, experts = expert_stack(3, 24, 128, quant_storage=quant_storage)
    assert stack.shape == (3, 24, 128) and stack.packed.shape[0] == 3 and stack.offset.shape == (3,)
    for e, weight in enumerate(experts):
        view = stack.expert(e)
        assert view.shape == weight.shape and view.blocksize == weight.blocksize
        assert torch.equal(view.packed, weight.packed.contiguous().view(torch.uint8).reshape(-1))
        for name in ("absmax", "nested_absmax", "offset"):
            assert torch.equal(getattr(view, name).reshape(-1), getattr(weight, name).reshape(-1)), name
        assert torch.equal(dequantize_4bit_torch(view, torch.float32), dequantize_4bit_torch(weight, torch.float32))


@parent_only
@requires_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_stack_of_bitsandbytes_experts_decodes_as_bitsandbytes(quant_type):
    # Expert e's slice is bitsandbytes' quantize_4bit(W[e]) with its own double quant: built from
    # bitsandbytes' own bytes and states, the stack decodes to what bitsandbytes dequantizes.
    bnb_f = bnb_functional()
    weights = torch.randn(3, 40, 192) * 0.05
    experts, expected = [], []
    for w in weights:
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
        experts.append(qlora.kernels.Packed4bit(packed, state.absmax, state.code, state.state2.absmax, state.state2.code,
                                                state.offset, 64, state.state2.blocksize, tuple(w.shape)))
        expected.append(bnb_f.dequantize_4bit(packed, state))
    assert torch.equal(dequantize_experts_torch(PackedExperts4bit.stack(experts), torch.float32), torch.stack(expected))


# ---- the twin ----------------------------------------------------------------------------------------
TWIN_CASES = [  # quant_type, blocksize, double_quant, out, in
    ("nf4", 64, True, 48, 128), ("fp4", 128, False, 40, 256), ("nf4", 256, True, 24, 512), ("fp4", 64, True, 33, 99),
]


@parent_only
@pytest.mark.parametrize("quant_type, blocksize, double_quant, n, k", TWIN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_twin_forward_and_backward_match_fp64(quant_type, blocksize, double_quant, n, k, dtype):
    stack, _ = expert_stack(len(COUNTS), n, k, quant_type, blocksize, double_quant)
    counts = torch.tensor(COUNTS)
    x = sorted_rows(COUNTS, k, dtype).requires_grad_()
    grad = sorted_rows(COUNTS, n, dtype, seed=2)
    set_backend("torch")
    try:
        y = grouped_linear_4bit(x, stack, counts)
        y.backward(grad)
    finally:
        set_backend(None)
    assert y.dtype == x.grad.dtype == dtype and y.shape == (sum(COUNTS), n)
    assert rel_err(y, reference_fp64(x.detach(), stack, COUNTS, True)) < product_tolerance(dtype, k)
    assert rel_err(x.grad, reference_fp64(grad, stack, COUNTS, False)) < product_tolerance(dtype, n)


@parent_only
def test_twin_rows_follow_their_expert():
    # Moving rows between experts changes the result: the twin multiplies each row by its own expert.
    # The rows that keep their expert keep their products, to fp32 rounding: a BLAS may sum a 3-row
    # product in another order than a 2-row one (bit-equal on one CPU, not on another).
    stack, _ = expert_stack(3, 16, 64)
    x = sorted_rows([2, 2, 2], 64, torch.float32)
    y = grouped_matmul_torch(x, stack, torch.tensor([2, 2, 2]), True)
    shifted = grouped_matmul_torch(x, stack, torch.tensor([3, 1, 2]), True)
    kept = product_tolerance(torch.float32, 64)
    assert rel_err(shifted[:2], y[:2]) < kept and rel_err(shifted[4:], y[4:]) < kept
    assert rel_err(shifted[2], y[2]) > 0.1


@parent_only
def test_grouped_linear_takes_any_stack_with_the_fields():
    # The quantized expert weight of qlora.quant holds the stack under the same names (a dataclass, its
    # shape a torch.Size): grouped_linear takes it as it is, and bad ones are refused by name.
    import dataclasses

    from qlora.kernels.moe import grouped_linear

    stack, _ = expert_stack(3, 24, 64)
    holder = dataclasses.make_dataclass("Holder", PackedExperts4bit._fields)(**dict(stack._asdict(), shape=torch.Size(stack.shape)))
    x, counts = sorted_rows([2, 0, 5], 64, torch.float32), torch.tensor([2, 0, 5])
    assert torch.equal(grouped_linear(x, holder, counts), grouped_linear_4bit(x, stack, counts))
    with pytest.raises(TypeError, match="Tensor is not a 4-bit expert stack: it has no packed"):
        grouped_linear(x, torch.zeros(3), counts)


@parent_only
def test_no_rows_give_an_empty_output_and_gradient():
    stack, _ = expert_stack(4, 24, 64)
    x = torch.randn(0, 64, requires_grad=True)
    y = grouped_linear_4bit(x, stack, torch.zeros(4, dtype=torch.int32))
    y.sum().backward()
    assert y.shape == (0, 24) and x.grad.shape == (0, 64)


@parent_only
def test_backend_switch_reaches_the_grouped_op():
    # QLORA_BACKEND=triton on CPU without the interpreter cannot run: the op asks the backend switch.
    stack, _ = expert_stack(2, 16, 64)
    set_backend("triton")
    try:
        with pytest.raises(BackendError, match="TRITON_INTERPRET"):
            grouped_linear_4bit(torch.randn(3, 64), stack, torch.tensor([1, 2]))
    finally:
        set_backend(None)


@parent_only
def test_fake_implementation_gives_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qlora.kernels.moe import ops

    stack, _ = expert_stack(3, 24, 64)
    with FakeTensorMode(allow_non_fake_inputs=True):
        forward = ops.matmul(torch.empty(7, 64), stack, torch.tensor([3, 0, 4]), True)
        backward = ops.matmul(torch.empty(7, 24), stack, torch.tensor([3, 0, 4]), False)
    assert tuple(forward.shape) == (7, 24) and tuple(backward.shape) == (7, 64)


@parent_only
@pytest.mark.parametrize("mutate, message", [
    (lambda s, x, c: (s, x, c[:-1]), "counts must be a 1-D int32/int64 tensor of 3"),
    (lambda s, x, c: (s, x, c.float()), "counts must be a 1-D int32/int64 tensor"),
    (lambda s, x, c: (s, x, torch.tensor([3, 0, 3])), r"summing to the input's 7 rows, got \[3, 0, 3\]"),
    (lambda s, x, c: (s, x, torch.tensor([8, 0, -1])), "non-negative"),
    (lambda s, x, c: (s, x[:, :32], c), "input has 32 features, the experts \\[3, 24, 64\\] need 64"),
    (lambda s, x, c: (s._replace(absmax=s.absmax[:2]), x, c), r"absmax has shape \[2, 24\]"),
    (lambda s, x, c: (s._replace(offset=s.offset[:1]), x, c), "offset must be 3 fp32 values"),
    (lambda s, x, c: (s._replace(shape=(3, 12, 64)), x, c), "packed experts have shape"),
])
def test_bad_input_is_one_line_naming_it(mutate, message):
    stack, _ = expert_stack(3, 24, 64)
    stack, x, counts = mutate(stack, torch.randn(7, 64), torch.tensor([3, 0, 4]))
    with pytest.raises(ValueError, match=message) as error:
        grouped_linear_4bit(x, stack, counts)
    assert "\n" not in str(error.value)


# ---- the kernel in the interpreter -------------------------------------------------------------------
@parent_only
def test_moe_kernels_in_interpreter():
    from helpers import run_interpreter_child

    run_interpreter_child(__file__)


INTERP_CASES = [  # quant_type, blocksize, double_quant, out, in, counts
    ("nf4", 64, True, 48, 128, COUNTS),                 # row tiles of whole blocks, 16-row tiles
    ("fp4", 128, False, 40, 256, [5, 66]),               # 64-row tiles forward, 32 backward
    ("nf4", 256, True, 24, 256, [0, 9, 0]),             # blocksize 256: 256-wide decoded tiles
    ("fp4", 64, True, 33, 99, [1, 0, 12, 4]),           # odd numel per expert: per-element decode, padded bytes
    ("nf4", 128, False, 20, 200, [0, 0, 0, 7, 1]),      # in % blocksize != 0, leading experts without tokens
]


@interpreter_only
@pytest.mark.parametrize("quant_type, blocksize, double_quant, n, k, counts", INTERP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interp_kernel_matches_the_twin(quant_type, blocksize, double_quant, n, k, counts, dtype):
    from qlora.kernels.moe.grouped import grouped_matmul_4bit

    stack, _ = expert_stack(len(counts), n, k, quant_type, blocksize, double_quant)
    counts_tensor = torch.tensor(counts, dtype=torch.int32)
    for transpose_weight, features, reduction in ((True, k, k), (False, n, n)):
        a = sorted_rows(counts, features, dtype)
        got = grouped_matmul_4bit(a, stack, counts_tensor, transpose_weight)
        want = grouped_matmul_torch(a, stack, counts_tensor, transpose_weight)
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < product_tolerance(dtype, reduction), (transpose_weight, rel_err(got, want))


@interpreter_only
def test_interp_prefill_tiles_of_128_rows():
    from qlora.kernels.moe.grouped import grouped_config, grouped_matmul_4bit

    stack, _ = expert_stack(2, 24, 64)
    counts, dtype = torch.tensor([120, 150]), torch.float16
    for transpose_weight, features in ((True, 64), (False, 24)):
        assert grouped_config(270, dtype, stack, transpose_weight, 90)["BLOCK_M"] == 128
        a = sorted_rows([270], features, dtype)
        got, want = grouped_matmul_4bit(a, stack, counts, transpose_weight), grouped_matmul_torch(a, stack, counts, transpose_weight)
        assert rel_err(got, want) < product_tolerance(dtype, features)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interp_split_reduction_for_decode(dtype):
    # Three rows over 3 experts against a 512-long reduction (forward over in, backward over out): a
    # handful of programs, so the reduction is split (fp32 partial sums, summed once).
    from qlora.kernels.moe.grouped import grouped_config, grouped_matmul_4bit, row_tiles_bound, split_k

    counts = torch.tensor([1, 0, 2])
    for transpose_weight, (n, k) in ((True, (24, 512)), (False, (512, 64))):
        stack, _ = expert_stack(3, n, k)
        r, cols = (k, n) if transpose_weight else (n, k)
        config = grouped_config(3, dtype, stack, transpose_weight, 90)
        programs = row_tiles_bound(3, 3, config["BLOCK_M"]) * -(-cols // config["BLOCK_N"])
        assert split_k(programs, r, config["BLOCK_R"], 132)[0] > 1
        a = sorted_rows([3], r, dtype)
        got, want = grouped_matmul_4bit(a, stack, counts, transpose_weight), grouped_matmul_torch(a, stack, counts, transpose_weight)
        assert rel_err(got, want) < product_tolerance(dtype, r), transpose_weight


@interpreter_only
def test_interp_strided_input_and_no_rows():
    from qlora.kernels.moe.grouped import grouped_matmul_4bit

    stack, _ = expert_stack(3, 24, 64)
    counts = torch.tensor([4, 0, 5])
    wide = sorted_rows([9], 128, torch.float32)
    a = wide[:, ::2]  # a column stride of 2
    assert rel_err(grouped_matmul_4bit(a, stack, counts, True), grouped_matmul_torch(a, stack, counts, True)) < 1e-6
    empty = grouped_matmul_4bit(torch.empty(0, 64), stack, torch.zeros(3, dtype=torch.int64), True)
    assert empty.shape == (0, 24)


@interpreter_only
@pytest.mark.parametrize("double_quant", [True, False])
def test_interp_fused_projection_one_launch_per_matrix(double_quant):
    # gate_up stacks keep gate and up as separately quantized matrices (qlora.quant.nf4.experts, segments):
    # on a GPU each is one launch over strided views of the stack, the outputs side by side.
    from qlora.quant.nf4.experts import ExpertWeight4bit, grouped_linear as grouped_linear_twin
    from qlora.kernels.moe import grouped_linear

    generator = torch.Generator().manual_seed(3)
    stack = ExpertWeight4bit.quantize(torch.randn(3, 2 * 24, 64, generator=generator) * 0.05, segments=2,
                                      double_quant=double_quant)
    counts = torch.tensor([4, 0, 7])
    x = sorted_rows([11], 64, torch.float32).requires_grad_()
    expected = grouped_linear_twin(x, stack, counts)  # CPU: the twin, matrix by matrix
    expected.backward(torch.ones_like(expected))
    expected_grad, x.grad = x.grad, None
    set_backend("triton")
    try:
        got = torch.cat([grouped_linear(x, stack.segment_stack(s), counts) for s in range(2)], dim=1)
        got.backward(torch.ones_like(got))
    finally:
        set_backend(None)
    assert rel_err(got, expected) < 1e-6 and rel_err(x.grad, expected_grad) < 1e-6


@interpreter_only
def test_interp_the_function_runs_the_kernel_through_the_op():
    stack, _ = expert_stack(4, 40, 128, blocksize=64)
    counts = torch.tensor([2, 0, 17, 3])
    x = sorted_rows([22], 128, torch.float32).requires_grad_()
    expected = grouped_linear_4bit(x, stack, counts)  # auto on CPU: the twin
    expected.sum().backward()
    expected_grad, x.grad = x.grad, None
    set_backend("triton")
    try:
        got = grouped_linear_4bit(x, stack, counts)
        got.sum().backward()
    finally:
        set_backend(None)
    assert rel_err(got, expected) < 1e-6 and rel_err(x.grad, expected_grad) < 1e-6


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interp_self_check_passes(dtype):
    from qlora.kernels import selfcheck
    from qlora.kernels.moe import ops

    ok, detail = selfcheck.CHECKS[ops.SELF_CHECK](torch.device("cpu"), dtype)
    assert ok, detail


# ---- compiled for each architecture -----------------------------------------------------------------
@parent_only
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_grouped_kernel_compiles_without_spills(arch):
    # Each tile configuration the launcher picks: 16-, 32- and 64-row tiles (decode, a few, and prefill
    # rows per expert), both products, row-tile decode at blocksize 64 and 256, the per-element decode,
    # and fp32's CUDA-core tiles; bf16 is the training dtype (fp16 lowers the same way).
    triton = pytest.importorskip("triton")
    from qlora.kernels import launch
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK, TENSOR_CORE_MMAS, machine_code
    from qlora.kernels.moe.grouped import grouped_matmul_4bit

    if triton.knobs.runtime.interpret:
        pytest.skip("compiles for a GPU: not under TRITON_INTERPRET=1")
    counts = torch.zeros(8, dtype=torch.int32)  # never read: compile_only runs nothing
    stacks = {64: expert_stack(8, 64, 512)[0], 256: expert_stack(8, 64, 512, blocksize=256)[0],
              "per_element": expert_stack(8, 64, 520, double_quant=False)[0]}
    # Rows over 8 experts: 8 (decode: 16-row tiles), 200 (32), 800 (64), 4096 (prefill: 128). Every
    # configuration on sm_90; elsewhere the decode tile and the ones nearest the register limit (64- and
    # 128-row tiles, the backward's heavy decodes), as compile time is CI time.
    runs = [(64, 8, True, torch.bfloat16), (64, 800, False, torch.bfloat16), (64, 4096, True, torch.bfloat16),
            (64, 4096, False, torch.bfloat16), (256, 4096, False, torch.bfloat16),
            ("per_element", 4096, False, torch.bfloat16)]
    if arch == 90:
        runs += [(64, 200, True, torch.bfloat16), (64, 200, False, torch.bfloat16), (256, 4096, True, torch.bfloat16),
                 ("per_element", 4096, True, torch.bfloat16), (64, 4096, True, torch.float32)]
    with launch.compile_only(arch) as compiled:
        for stack_key, rows, transpose_weight, dtype in runs:
            stack = stacks[stack_key]
            a = torch.randn(rows, stack.shape[2] if transpose_weight else stack.shape[1], dtype=dtype)
            grouped_matmul_4bit(a, stack, counts, transpose_weight)
    assert len(compiled) == len(runs)
    assert {launched.constexprs["BLOCK_M"] for launched in compiled} == {16, 32, 64, 128}
    # Few programs over a 512-long reduction (forward) split it; the 64-long backward does not.
    assert {launched.constexprs["SPLIT_K"] > 1 for launched in compiled} == {True, False}
    for launched in compiled:
        code = machine_code(launched.kernel, arch)
        where = f"{launched.constexprs} on sm_{arch}"
        assert code.local_bytes == 0, f"{where} spills {code.local_bytes} B/thread ({code.registers} registers)"
        assert code.shared_bytes <= MAX_SHARED_PER_BLOCK[arch] and code.blocks_per_sm >= 1, where
        if launched.constexprs["INPUT_PRECISION"] == "tf32":  # 16-bit products; fp32 runs on the CUDA cores
            assert code.count(TENSOR_CORE_MMAS) > 0, f"{where}: the product missed the tensor cores"
