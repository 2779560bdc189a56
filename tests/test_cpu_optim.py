"""The CPU 8-bit AdamW step (C kernel, kernels/optim/cpu.c) against its PyTorch twin.

Codes and absmax must be the twin's bit for bit (they feed every later step). The parameter too,
where the kernel found torch's fp32 square root (cpu.torch_sqrt: MKL's vmsSqrt in a torch built with
MKL, the IEEE one otherwise); where it could not, within one fp32 rounding per step, as the Triton
kernel's. Several consecutive steps from one state, so a difference would compound; odd sizes (a
partial last block, sizes below one SIMD step); every test at 1 and 2 threads.
"""
import warnings

import pytest
import torch

import qlora.kernels
from qlora.kernels import native, selfcheck, set_backend
from qlora.kernels.optim import AdamW8bitHyper, AdamW8bitTensors, cpu, ops, reference
from qlora.quant import dynamic_map

needs_compiler = pytest.mark.skipif(not cpu.available(), reason="no C compiler: the CPU step is the twin")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
GUARD = 64  # elements past the end of every state tensor that no step may touch


def codes():
    return dynamic_map("cpu", signed=True), dynamic_map("cpu", signed=False)


def random_state(n, param_dtype, blocksize, seed=0):
    """A guarded state: each tensor a view of a longer buffer whose tail holds 77."""
    g = torch.Generator().manual_seed(seed)
    signed, unsigned = codes()
    exp_avg, exp_avg_absmax = reference.quantize_blockwise_8bit(torch.randn(n, generator=g) * 1e-2, signed, blocksize)
    exp_avg_sq, exp_avg_sq_absmax = reference.quantize_blockwise_8bit(torch.rand(n, generator=g) * 1e-4, unsigned, blocksize)
    state = dict(param=torch.randn(n, generator=g).to(param_dtype), exp_avg=exp_avg, exp_avg_absmax=exp_avg_absmax,
                 exp_avg_sq=exp_avg_sq, exp_avg_sq_absmax=exp_avg_sq_absmax)
    buffers = {k: torch.cat((v, torch.full((GUARD,), 77, dtype=v.dtype))) for k, v in state.items()}
    return {k: b[: state[k].numel()] for k, b in buffers.items()}, buffers


def step_(update, state, grad, step, blocksize=256, **hyper):
    signed, unsigned = codes()
    update(AdamW8bitTensors(grad=grad, **state, signed_code=signed, unsigned_code=unsigned),
           AdamW8bitHyper(step=step, **{**HYPER, **hyper}, blocksize=blocksize))


def same_bits(got, want):
    return torch.equal(got.view(torch.uint8), want.view(torch.uint8)) if got.dtype.is_floating_point else torch.equal(got, want)


def assert_same_state(got, want, what):
    for name in want:
        if name == "param" and not cpu.torch_sqrt().exact:
            ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[want[name].dtype]
            assert torch.allclose(got[name].double(), want[name].double(), rtol=2 * ulp, atol=0), what
            continue
        differ = (got[name] != want[name]).sum().item() if not same_bits(got[name], want[name]) else 0
        assert same_bits(got[name], want[name]), f"{name}: {differ} of {got[name].numel()} differ ({what})"


def compare_steps(n, param_dtype, grad_dtype, steps=3, blocksize=256, **hyper):
    got, buffers = random_state(n, param_dtype, blocksize)
    want = {k: v.clone() for k, v in got.items()}
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=g) * 0.1).to(grad_dtype)
        step_(cpu.adamw8bit_update_cpu, got, grad, step, blocksize, **hyper)
        step_(reference.adamw8bit_update_, want, grad, step, blocksize, **hyper)
        assert_same_state(got, want, f"step {step}")
    for name, buffer in buffers.items():
        assert (buffer[-GUARD:] == 77).all(), f"{name} was written past its end"
    return got, want


@needs_compiler
@pytest.mark.parametrize("n", [1, 15, 257, 1000])
@pytest.mark.parametrize("param_dtype,grad_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_steps_are_the_twins_bits(threads, n, param_dtype, grad_dtype, weight_decay):
    compare_steps(n, param_dtype, grad_dtype, weight_decay=weight_decay)


@needs_compiler
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_large_parameter_split_over_threads(threads, param_dtype):
    # 70001 elements = 274 blocks: both threads' ranges, a partial last block, the SIMD loops and tails.
    compare_steps(70001, param_dtype, param_dtype)


@needs_compiler
@pytest.mark.parametrize("blocksize", [32, 64, 2048, 4096])
def test_every_blocksize(threads, blocksize):
    compare_steps(3 * blocksize + 77, torch.float32, torch.float32, steps=2, blocksize=blocksize)


@needs_compiler
@pytest.mark.parametrize("hyper", [
    dict(beta1=0.3),  # lerp weight 0.7 >= 0.5: torch's other lerp formula
    dict(lr=1e-3, beta2=0.95, eps=1e-6, weight_decay=0.0),
    dict(beta1=0.0, beta2=0.0),  # the moments are the gradient (and its square) each step
])
def test_other_hyperparameters(threads, hyper):
    compare_steps(1000, torch.float32, torch.float32, steps=3, **hyper)


@needs_compiler
def test_zero_block_and_non_finite_gradients(threads):
    # A zero block stays absmax 0 with the code of 0; a NaN gradient makes its block's absmax NaN and
    # its codes 255 (torch.bucketize sorts NaN past every midpoint); an inf gradient makes its block's absmax
    # inf and its own code inf / inf = NaN -> 255.
    n = 1000
    got, _ = random_state(n, torch.float32, 256)
    got["exp_avg_absmax"][1] = got["exp_avg_sq_absmax"][1] = 0
    want = {k: v.clone() for k, v in got.items()}
    grad = torch.randn(n) * 0.1
    grad[256:512] = 0
    grad[600], grad[800] = float("nan"), float("inf")
    step_(cpu.adamw8bit_update_cpu, got, grad, 1)
    step_(reference.adamw8bit_update_, want, grad, 1)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(got[name], want[name]), name
        absmax = got[name + "_absmax"]
        assert absmax[1] == 0 and absmax[2].isnan() and absmax[3] == float("inf")
        assert torch.allclose(absmax, want[name + "_absmax"], rtol=0, atol=0, equal_nan=True), name
    assert torch.equal(got["param"].isnan(), want["param"].isnan())
    assert torch.equal(got["param"][:512], want["param"][:512])


@needs_compiler
def test_square_root_is_torchs():
    # Fresh values, not the probe the choice was made on.
    values = torch.rand(1 << 18, generator=torch.Generator().manual_seed(5)) * 1e-3
    root = cpu.torch_sqrt()
    if not root.exact:
        pytest.skip(f"torch's fp32 sqrt is none the kernel knows here ({root.name})")
    got, _ = random_state(values.numel(), torch.float32, 256)
    # A second moment of exactly `values`: beta2 = 0 makes v = g * g; the parameter reads its root.
    grad = values.sqrt()
    want = {k: t.clone() for k, t in got.items()}
    step_(cpu.adamw8bit_update_cpu, got, grad, 1, beta2=0.0)
    step_(reference.adamw8bit_update_, want, grad, 1, beta2=0.0)
    assert same_bits(got["param"], want["param"])


@needs_compiler
def test_dispatch_auto_and_cpu_run_the_kernel_torch_the_twin(monkeypatch):
    assert selfcheck.passed("cpu_adamw8bit", torch.device("cpu"), torch.float32)  # run before counting calls
    calls = []
    real = cpu.adamw8bit_update_cpu
    monkeypatch.setattr(cpu, "adamw8bit_update_cpu", lambda *a: calls.append(1) or real(*a))
    state, _ = random_state(300, torch.float32, 256)
    signed, unsigned = codes()

    def public_step():
        qlora.kernels.adamw8bit_update_(state["param"], torch.randn(300), state["exp_avg"], state["exp_avg_absmax"],
                                        state["exp_avg_sq"], state["exp_avg_sq_absmax"], signed, unsigned, step=1,
                                        **HYPER)
    for backend, expected in (("auto", 1), ("cpu", 2), ("torch", 2)):
        monkeypatch.setenv("QLORA_BACKEND", backend)
        public_step()
        assert len(calls) == expected, backend


def test_no_compiler_steps_with_the_twin_after_one_warning(monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.delenv("QLORA_BACKEND", raising=False)
    native.load.cache_clear()
    try:
        state, _ = random_state(300, torch.float32, 256)
        want = {k: v.clone() for k, v in state.items()}
        grad = torch.randn(300) * 0.1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                step_(lambda t, h: ops.adamw8bit_update_(*t, **h._asdict()), state, grad, 1)
        assert len([w for w in caught if "no C compiler found" in str(w.message)]) == 1
        step_(reference.adamw8bit_update_, want, grad, 1)
        step_(reference.adamw8bit_update_, want, grad, 1)
        assert_same_state(state, want, "fallback")
        monkeypatch.setenv("QLORA_BACKEND", "cpu")
        with pytest.raises(qlora.kernels.backend.BackendError, match="QLORA_BACKEND=cpu but the CPU kernels"):
            step_(lambda t, h: ops.adamw8bit_update_(*t, **h._asdict()), state, grad, 2)
    finally:
        native.load.cache_clear()
        set_backend(None)


@needs_compiler
@pytest.mark.parametrize("code_kind", ["dynamic", "random"])
def test_nearest_code_is_bucketize_at_midpoints_and_ties(code_kind):
    # beta1 = 0 makes the new first moment the gradient itself, and a 1.0 at the head of every block
    # makes its absmax 1: the scaled values are the gradient's, exactly. They sit on every midpoint
    # (ties go to the lower code), one float either side, on the codes, at +-1 and +-0. A random code
    # has midpoints closer than the bucket width: the table's extra compares run.
    signed, _ = codes()
    if code_kind == "random":
        signed = torch.sort(torch.rand(256, generator=torch.Generator().manual_seed(4)) * 2 - 1).values
        signed[0], signed[-1] = -1.0, 1.0
    assert code_kind == "dynamic" or cpu.nearest_table(signed).extra > 0
    mid = 0.5 * (signed[:-1] + signed[1:])
    values = torch.cat((mid, mid.nextafter(torch.tensor(-2.0)), mid.nextafter(torch.tensor(2.0)), signed,
                        torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-40, -1e-40])))
    blocks = values.split(255)
    grad = torch.cat([torch.cat((torch.ones(1), block)) for block in blocks])
    n = grad.numel()
    state, _ = random_state(n, torch.float32, 256)
    want = {k: v.clone() for k, v in state.items()}
    unsigned = dynamic_map("cpu", signed=False)
    for update, target in ((cpu.adamw8bit_update_cpu, state), (reference.adamw8bit_update_, want)):
        update(AdamW8bitTensors(grad=grad, **target, signed_code=signed, unsigned_code=unsigned),
               AdamW8bitHyper(step=1, **{**HYPER, "beta1": 0.0}))
    assert (want["exp_avg_absmax"] == 1).all()
    assert torch.equal(state["exp_avg"], want["exp_avg"])
    assert torch.equal(want["exp_avg"][1:256].long(), torch.bucketize(blocks[0], mid))  # the twin is bucketize


@needs_compiler
def test_a_step_that_evicts_its_own_tables_from_the_cache(threads):
    # The table cache holds 16 codes; with 15 held, looking up the unsigned code clears it, dropping the
    # signed code's table: the step must still read that table, not freed memory (tables rebuilt from
    # fresh random codes every time, as doctor's self-check does).
    for _ in range(4):
        cpu._TABLES.clear()
        for seed in range(15):
            cpu.nearest_table(torch.sort(torch.rand(256, generator=torch.Generator().manual_seed(seed))).values)
        g = torch.Generator().manual_seed(20)
        signed = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
        unsigned = torch.sort(torch.rand(256, generator=g)).values
        got, _ = random_state(4096, torch.float32, 256)
        want = {k: v.clone() for k, v in got.items()}
        grad = torch.randn(4096, generator=g) * 0.1
        for update, state in ((cpu.adamw8bit_update_cpu, got), (reference.adamw8bit_update_, want)):
            update(AdamW8bitTensors(grad=grad, **state, signed_code=signed, unsigned_code=unsigned),
                   AdamW8bitHyper(step=1, **HYPER))
            torch.rand(1 << 16)  # allocations between steps would take over freed table memory
        assert_same_state(got, want, "tables evicted mid-step")


def test_reloaded_libraries_are_typed_again():
    # After load.cache_clear() a new CDLL may take a dropped one's id: it must still get its argtypes.
    if not cpu.available():
        pytest.skip("no C compiler")
    for _ in range(20):
        native.load.cache_clear()
        assert cpu.library().qlora_adamw8bit_step.argtypes is not None  # dropped at once: its id is free again
    native.load.cache_clear()
