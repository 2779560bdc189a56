"""The fused 8-bit AdamW step: the Triton kernel against the reference, the dispatch, the checks.

- `test_interp_*`: the kernel on CPU through the Triton interpreter, in a child pytest with
  TRITON_INTERPRET=1 (`test_optim_kernels_in_interpreter` starts it; see helpers.run_interpreter_child).
  fp16/fp32 only: the interpreter cannot do bf16 arithmetic. The new codes and absmax must equal
  the reference's bit for bit; the parameter may differ by one rounding, because torch's CPU sqrt
  is not correctly rounded (the kernel's is) and that only feeds the parameter.
- CPU tests of the dispatch and of the input checks (reference backend).
- `test_gpu_*`: 16M-element parameters in bf16/fp32 on CUDA, skipped without it.
"""
import os
import sys

import pytest
import torch

import qlora.kernels
from qlora.kernels.optim import reference
from qlora.kernels import set_backend
from qlora.kernels.optim import AdamW8bitHyper, AdamW8bitTensors
from qlora.quant import dynamic_map
from helpers import rel_err, run_interpreter_child

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child (test_optim_kernels_in_interpreter)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
GUARD = 300  # elements past the end of every state tensor that no step may touch


def codes(device="cpu"):
    return dynamic_map(device, signed=True), dynamic_map(device, signed=False)


def random_state(n, param_dtype, device="cpu", zero_block=None):
    """param and both moments as the reference quantizer leaves them, from random fp32 moments."""
    signed, unsigned = codes(device)
    m = torch.randn(n, device=device) * 1e-2
    v = torch.rand(n, device=device) * 1e-4
    if zero_block is not None:
        m[zero_block * 256:(zero_block + 1) * 256] = 0
        v[zero_block * 256:(zero_block + 1) * 256] = 0
    exp_avg, exp_avg_absmax = reference.quantize_blockwise_8bit(m, signed, 256)
    exp_avg_sq, exp_avg_sq_absmax = reference.quantize_blockwise_8bit(v, unsigned, 256)
    param = torch.randn(n, device=device).to(param_dtype)
    return dict(param=param, exp_avg=exp_avg, exp_avg_absmax=exp_avg_absmax, exp_avg_sq=exp_avg_sq,
                exp_avg_sq_absmax=exp_avg_sq_absmax)


def guarded(state):
    """A copy of `state` whose tensors are views of longer buffers filled past the end with 77."""
    views, buffers = {}, {}
    for name, t in state.items():
        buffers[name] = torch.full((t.numel() + GUARD,), 77, dtype=t.dtype, device=t.device)
        buffers[name][: t.numel()] = t
        views[name] = buffers[name][: t.numel()]
    return views, buffers


def assert_guards_intact(state, buffers):
    for name, buffer in buffers.items():
        assert (buffer[state[name].numel():] == 77).all(), f"{name} was written past its end"


def step_(update, state, grad, step, **hyper):
    """One step of `update`, an implementation taking (AdamW8bitTensors, AdamW8bitHyper)."""
    signed, unsigned = codes(grad.device)
    update(AdamW8bitTensors(grad=grad, **state, signed_code=signed, unsigned_code=unsigned),
           AdamW8bitHyper(step=step, **{**HYPER, **hyper}))


def public_op(tensors, hyper):
    """qlora.kernels.adamw8bit_update_ (the op users call, with its keyword form) as an implementation."""
    qlora.kernels.adamw8bit_update_(*tensors, **hyper._asdict())


def assert_param_close(got, want, before):
    """Element by element, at most about one rounding of the parameter's dtype apart.

    The bound scales with |before| too: p * decay + update cancels when the update is close to
    -p, and a last-bit difference in the update is then large against the small result.
    """
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[want.dtype]
    diff = (got.double() - want.double()).abs()
    bound = 2 * ulp * (want.double().abs() + before.double().abs())
    assert (diff <= bound).all(), ((diff / bound).max().item(), want.dtype)
    assert rel_err(got, want) < (1e-6 if want.dtype == torch.float32 else ulp)


def compare_steps(update, n, param_dtype, grad_dtype, steps=5, device="cpu", zero_block=None, **hyper):
    """`steps` consecutive steps of `update` and of the reference from one random state.

    Block `zero_block` (if any) starts with zero moments and gets zero gradients: it stays zero.
    """
    want = random_state(n, param_dtype, device, zero_block)
    got, buffers = guarded(want)
    want = {k: v.clone() for k, v in want.items()}
    for step in range(1, steps + 1):
        grad = (torch.randn(n, device=device) * 0.1).to(grad_dtype)
        if zero_block is not None:
            grad[zero_block * 256:(zero_block + 1) * 256] = 0
        # One-step parameter comparison: the parameters may be one rounding apart, and that must
        # not compound; the moments run on independently and must stay identical.
        got["param"].copy_(want["param"])
        before = want["param"].clone()
        step_(update, got, grad, step, **hyper)
        step_(reference.adamw8bit_update_, want, grad, step, **hyper)
        for name in ("exp_avg", "exp_avg_sq"):
            mismatch = (got[name] != want[name]).sum().item()
            assert mismatch == 0, f"{name}: {mismatch} of {n} codes differ at step {step}"
            assert torch.equal(got[name + "_absmax"], want[name + "_absmax"]), (name, step)
        assert_param_close(got["param"], want["param"], before)
    assert_guards_intact(got, buffers)
    return got, want


# ---- the interpreter child ----------------------------------------------------------------------
if INTERPRETED:  # a jit kernel resolves names in its module's globals; the parent never imports triton here
    import triton
    import triton.language as tl

    from qlora.kernels.optim.adamw8bit import _nearest_code

    @triton.jit
    def _nearest_kernel(x_ptr, midpoints_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, _nearest_code(tl.load(x_ptr + i), midpoints_ptr))


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run itself")
def test_optim_kernels_in_interpreter():
    run_interpreter_child(__file__)


@interpreter_only
@pytest.mark.parametrize("n", (1, 255, 256, 257, 1000, 4096 + 17))
@pytest.mark.parametrize("param_dtype, grad_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16)])
def test_interp_matches_reference(n, param_dtype, grad_dtype):
    from qlora.kernels.optim.adamw8bit import adamw8bit_update_triton

    compare_steps(adamw8bit_update_triton, n, param_dtype, grad_dtype)


@interpreter_only
@pytest.mark.parametrize("grad_dtype, hyper", [
    (torch.float32, dict(beta1=0.3)),  # lerp weight 0.7 >= 0.5: torch's other lerp formula
    (torch.float32, dict(zero_block=1)),  # an all-zero block: absmax 0, scaled by 1, the code of 0
    (torch.float16, dict(weight_decay=0.0, lr=1e-3, beta2=0.95)),  # fp16 grad into an fp32 param
])
def test_interp_matches_reference_special_cases(grad_dtype, hyper):
    from qlora.kernels.optim.adamw8bit import adamw8bit_update_triton

    got, _ = compare_steps(adamw8bit_update_triton, 1000, torch.float32, grad_dtype, steps=2, **hyper)
    if "zero_block" in hyper:
        signed, unsigned = codes()
        assert got["exp_avg_absmax"][1] == 0 and got["exp_avg_sq_absmax"][1] == 0
        assert (signed[got["exp_avg"][256:512].long()] == 0).all()
        assert (unsigned[got["exp_avg_sq"][256:512].long()] == 0).all()


@interpreter_only
def test_interp_non_finite_gradients_match_reference():
    # A NaN gradient makes its block's absmax NaN in the reference (amax propagates NaN; tl.max
    # would drop it), the NaN moment gets code 255 (bucketize puts NaN past every midpoint; the
    # binary search would stop at 0), and an inf gradient gives inf / inf = NaN the same way.
    from qlora.kernels.optim.adamw8bit import adamw8bit_update_triton

    n = 1000
    want = random_state(n, torch.float32)
    got = {k: v.clone() for k, v in want.items()}
    grad = torch.randn(n) * 0.1
    grad[300], grad[600] = float("nan"), float("inf")
    step_(adamw8bit_update_triton, got, grad, 1)
    step_(reference.adamw8bit_update_, want, grad, 1)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(got[name], want[name]), (name, (got[name] != want[name]).nonzero()[:5].tolist())
        assert torch.equal(got[name + "_absmax"].isnan(), want[name + "_absmax"].isnan()), name
        assert want[name + "_absmax"][1].isnan() and want[name][300] == 255
        finite = ~want[name + "_absmax"].isnan()
        assert torch.equal(got[name + "_absmax"][finite], want[name + "_absmax"][finite]), name
    assert torch.equal(got["param"].isnan(), want["param"].isnan())


@interpreter_only
def test_interp_nearest_code_is_bucketize():
    # Scaled values exactly on every midpoint (ties go to the lower code), one float either side,
    # on the codes themselves, and at the ends of the range.
    from qlora.kernels.optim.adamw8bit import code_midpoints

    for code in codes():
        mid = 0.5 * (code[:-1] + code[1:])
        x = torch.cat((mid, mid.nextafter(torch.tensor(-2.0)), mid.nextafter(torch.tensor(2.0)), code,
                       torch.tensor([-1.0, 1.0, 0.0, -0.0, 1.5, -1.5, float("nan"), float("inf"), -float("inf")])))
        x = torch.cat((x, x.new_zeros(2048 - x.numel())))
        out = torch.full((2048,), -1, dtype=torch.int32)
        _nearest_kernel[(1,)](x, code_midpoints(code), out, N=2048)
        assert torch.equal(out.long(), torch.bucketize(x, mid))


@interpreter_only
def test_interp_midpoints_cache_follows_in_place_edits():
    from qlora.kernels.optim.adamw8bit import code_midpoints

    code = dynamic_map(signed=False).clone()
    table = code_midpoints(code)
    assert table.numel() == 256 and table[-1] == float("inf") and code_midpoints(code) is table
    code.mul_(0.5)
    assert torch.equal(code_midpoints(code)[:255], 0.5 * (code[:-1] + code[1:]))


@interpreter_only
def test_interp_dispatch_runs_the_kernel(monkeypatch):
    from qlora.kernels.optim import adamw8bit

    calls = []
    original = adamw8bit.adamw8bit_update_triton
    monkeypatch.setattr(adamw8bit, "adamw8bit_update_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    set_backend("triton")
    try:
        compare_steps(public_op, 300, torch.float32, torch.float32, steps=1)
    finally:
        set_backend(None)
    assert calls


# ---- CPU: dispatch and checks --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("torch", "auto"))
def test_dispatch_on_cpu_never_imports_the_triton_kernel(monkeypatch, backend):
    # torch runs the reference, auto the C kernel where a compiler builds it (tests/test_cpu_optim.py).
    monkeypatch.setenv("QLORA_BACKEND", backend)
    monkeypatch.delitem(sys.modules, "qlora.kernels.optim.adamw8bit", raising=False)
    compare_steps(public_op, 257, torch.float32, torch.float32, steps=2)
    assert "qlora.kernels.optim.adamw8bit" not in sys.modules  # the CPU path never imports the kernel


def test_dispatch_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    state = random_state(10, torch.float32)
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors.*TRITON_INTERPRET=1"):
        step_(public_op, state, torch.randn(10), 1)


def test_dispatch_updates_a_leaf_that_requires_grad(monkeypatch):
    # An optimizer step runs outside autograd; in-place writes to such a leaf would otherwise raise.
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    state = random_state(10, torch.float32)
    state["param"].requires_grad_(True)
    before = state["param"].detach().clone()
    step_(public_op, state, torch.randn(10), 1)
    assert not torch.equal(state["param"].detach(), before)


def _bad(name, value):
    return lambda args: {**args, name: value(args[name])}


INPUT_ERRORS = [
    (_bad("exp_avg", lambda t: t.float()), TypeError, "exp_avg holds 8-bit codes and must be uint8, got torch.float32"),
    (_bad("exp_avg_sq_absmax", lambda t: t.half()), TypeError,
     "exp_avg_sq_absmax must be float32, got torch.float16; allocate it with dtype=torch.float32"),
    (_bad("exp_avg_absmax", lambda t: t[:-1]), ValueError,
     "exp_avg_absmax has 3 entries, 1000 elements in blocks of 256 need 4"),
    (_bad("exp_avg_sq", lambda t: t[:-1]), ValueError, "exp_avg_sq has 999 codes but param has 1000"),
    (_bad("grad", lambda t: t[:-1]), ValueError, "grad has 999 elements but param has 1000"),
    (_bad("grad", lambda t: t.double()), TypeError,
     r"grad must be float32, float16 or bfloat16, got torch.float64; cast it with .to\(param.dtype\)"),
    (_bad("param", lambda t: t.double()), TypeError, "param must be float32, float16 or bfloat16, got torch.float64"),
    (_bad("param", lambda t: t.view(10, 100)), ValueError,
     r"param must be 1-D, got shape \[10, 100\]; pass param.view\(-1\)"),
    (_bad("grad", lambda t: torch.stack((t, t), 1)[:, 0]), ValueError, "grad must be contiguous"),
    (_bad("exp_avg_absmax", lambda t: t.to("meta")), ValueError, "exp_avg_absmax is on meta but param is on cpu"),
    (_bad("signed_code", lambda t: t[:255]), ValueError,
     "signed_code must be the 256 sorted fp32 code values, got 255 of torch.float32"),
    (_bad("unsigned_code", lambda t: t.double()), ValueError,
     "unsigned_code must be the 256 sorted fp32 code values, got 256 of torch.float64"),
    (_bad("blocksize", lambda b: 100), ValueError, r"blocksize must be a power of two in \[32, 4096\], got 100"),
    (_bad("step", lambda s: 0), ValueError, "step must be the 1-based count of optimizer steps"),
]


@pytest.mark.parametrize("break_args, error, message", INPUT_ERRORS)
def test_input_errors(monkeypatch, break_args, error, message):
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    signed, unsigned = codes()
    state = random_state(1000, torch.float32)
    args = dict(state, grad=torch.randn(1000), signed_code=signed, unsigned_code=unsigned, step=1, blocksize=256)
    args = break_args(args)
    with pytest.raises(error, match=message):
        qlora.kernels.adamw8bit_update_(
            args["param"], args["grad"], args["exp_avg"], args["exp_avg_absmax"], args["exp_avg_sq"],
            args["exp_avg_sq_absmax"], args["signed_code"], args["unsigned_code"], step=args["step"],
            blocksize=args["blocksize"], **HYPER)


# ---- GPU: real sizes, bf16/fp32 -------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("param_dtype, grad_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_gpu_matches_reference(param_dtype, grad_dtype):
    from qlora.kernels.optim.adamw8bit import adamw8bit_update_triton

    n = (1 << 24) + 17  # a partial last block
    want = random_state(n, param_dtype, "cuda")
    got = {k: v.clone() for k, v in want.items()}
    for step in range(1, 4):
        grad = (torch.randn(n, device="cuda") * 0.1).to(grad_dtype)
        got["param"].copy_(want["param"])
        before = want["param"].clone()
        step_(adamw8bit_update_triton, got, grad, step)
        step_(reference.adamw8bit_update_, want, grad, step)
        for name in ("exp_avg", "exp_avg_sq"):
            # The kernel repeats torch's CUDA roundings operation for operation, so the codes are
            # expected to be identical. The allowance (off by one, one code in a million) only
            # keeps a last-bit difference in a CUDA math routine from failing the test; a logic
            # error changes far more codes than that.
            diff = (got[name].int() - want[name].int()).abs()
            assert diff.max() <= 1 and (diff > 0).sum().item() <= n // 10**6, (name, step, (diff > 0).sum().item())
            torch.testing.assert_close(got[name + "_absmax"], want[name + "_absmax"], rtol=1e-6, atol=0)
        # torch divides by the scalar sqrt(bias correction 2) as a multiply by its reciprocal on
        # CUDA; the kernel divides: the parameter may be one rounding apart.
        assert_param_close(got["param"], want["param"], before)
