"""The self-check on first use: before a Triton path first runs on a (device, dtype), it runs once
on a small problem against the PyTorch twin. If the result is wrong it warns once, naming the path
and the device, and that path falls back to the twin for the rest of the process: a training run
never goes on with a silently wrong kernel on a GPU this project could not test on.

Paths: "dequantize" (bit-exact against reference.dequantize_4bit_torch), "gemv" and "fused"
(forward and backward products against the twin's product on the same dequantized W, relative
error within the dtype's tolerance), "adamw8bit" (codes and absmax bit-exact, the parameter within
an fp32 rounding). "dequant_matmul" is the dequantize kernel then torch, so its check is
"dequantize"'s. Each check is one small launch per kernel and a comparison: a few milliseconds on
a GPU (the first compile of a kernel is paid by the real call anyway), logged at INFO on the
"qlora.kernels" logger with its cost.

Not during CUDA-graph capture (a check syncs to compare): a path first met inside a capture
runs unchecked, and is checked at its next call outside one. `QLORA_SELF_CHECK=0` skips the checks.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Callable

import torch

from qlora.kernels import reference
from qlora.kernels.packed import Packed4bit

log = logging.getLogger("qlora.kernels")
# Relative error of a product against the twin's on the same dequantized W: fp32 products differ by
# ~1e-7 (summation order), 16-bit outputs by one rounding (2^-11 fp16, 2^-8 bf16) plus the sum.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
_RESULTS: dict[tuple[str, str, torch.dtype], bool] = {}


def enabled() -> bool:
    return os.environ.get("QLORA_SELF_CHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def reset() -> None:
    """Forget every result: the next use of each path checks again."""
    _RESULTS.clear()


def results() -> dict:
    """{"path on device dtype": passed} of every check run so far."""
    return {f"{path} on {device} {str(dtype).removeprefix('torch.')}": ok for (path, device, dtype), ok in _RESULTS.items()}


def passed(path: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `path` may run on (device, dtype); runs its check the first time."""
    if path == "dequant_matmul":
        path = "dequantize"
    key = (path, str(device), dtype)
    if key in _RESULTS:
        return _RESULTS[key]
    if not enabled() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return True
    start = time.perf_counter()
    try:
        problem = CHECKS[path](device, dtype)
        ok, detail = problem
    except Exception as error:  # a kernel that cannot even run on this GPU is a failed check
        ok, detail = False, f"{type(error).__name__}: {error}"
    _RESULTS[key] = ok
    cost_ms = (time.perf_counter() - start) * 1e3
    if ok:
        log.info("self-check %s on %s %s: PASS in %.1f ms", path, device, dtype, cost_ms)
    else:
        log.info("self-check %s on %s %s: FAIL in %.1f ms (%s)", path, device, dtype, cost_ms, detail)
        warnings.warn(f"the Triton {path} kernel gave a wrong result on {device} ({dtype}): {detail}; "
                      "using the PyTorch reference for it from now on. Please report this with the output "
                      "of `qlora doctor`", RuntimeWarning, stacklevel=3)
    return ok


# ---- the problems ------------------------------------------------------------------------------------
def sample_weight(device: torch.device, out_features: int = 48, in_features: int = 128, blocksize: int = 64,
                  seed: int = 0) -> Packed4bit:
    """A double-quantized 4-bit weight of random bytes and scales (no quantizer needed: the kernel
    and the twin decode the same bytes). in_features % blocksize == 0: the row-tile decode."""
    g = torch.Generator().manual_seed(seed)
    numel = out_features * in_features
    blocks = numel // blocksize
    code = torch.sort(torch.rand(16, generator=g) * 2 - 1).values
    weight = Packed4bit(
        packed=torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g),
        absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g), code=code,
        nested_absmax=torch.rand(-(-blocks // 256), generator=g) * 0.1 + 0.01,
        nested_code=torch.sort(torch.rand(256, generator=g) * 2 - 1).values, offset=torch.tensor(0.05),
        blocksize=blocksize, nested_blocksize=256, shape=(out_features, in_features))
    return Packed4bit(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in weight))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _check_dequantize(device, dtype):
    from qlora.kernels.dequantize import dequantize_4bit_triton

    weight = sample_weight(device)
    got = dequantize_4bit_triton(weight, dtype)
    want = reference.dequantize_4bit_torch(weight, dtype)
    mismatched = (got != want).sum().item()
    return mismatched == 0, f"{mismatched} of {got.numel()} elements differ from the reference"


def _product_check(run: Callable, rows: int):
    def check(device, dtype):
        weight = sample_weight(device)
        w = reference.dequantize_4bit_torch(weight, dtype).double()
        g = torch.Generator().manual_seed(1)
        errors = []
        for transpose_weight in (True, False):
            features = weight.shape[1] if transpose_weight else weight.shape[0]
            a = torch.randn(rows, features, generator=g).to(device=device, dtype=dtype)
            want = a.double() @ (w.T if transpose_weight else w)
            errors.append(_rel_err(run(a, weight, transpose_weight), want))
        worst = max(errors)
        return worst < TOLERANCE[dtype], f"relative error {worst:.2e} (forward, backward: {errors}), tolerance {TOLERANCE[dtype]:.0e}"
    return check


def _gemv(a, weight, transpose_weight):
    from qlora.kernels.gemv import gemv_4bit

    return gemv_4bit(a, weight, transpose_weight)


def _fused(a, weight, transpose_weight):
    from qlora.kernels.matmul import matmul_4bit_fused

    return matmul_4bit_fused(a, weight, transpose_weight)


def _check_adamw8bit(device, dtype):
    from qlora.kernels.adamw8bit import adamw8bit_update_triton

    n, blocksize = 700, 256
    g = torch.Generator().manual_seed(2)
    signed = torch.sort(torch.rand(256, generator=g) * 2 - 1).values.to(device)
    unsigned = torch.sort(torch.rand(256, generator=g)).values.to(device)
    blocks = -(-n // blocksize)
    state = dict(param=torch.randn(n, generator=g), grad=torch.randn(n, generator=g) * 0.1,
                 exp_avg=torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g), exp_avg_absmax=torch.rand(blocks, generator=g) * 1e-2,
                 exp_avg_sq=torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g), exp_avg_sq_absmax=torch.rand(blocks, generator=g) * 1e-4)
    state = {k: v.to(device) for k, v in state.items()}
    state["grad"] = state["grad"].to(dtype)
    mine = {k: v.clone() for k, v in state.items()}
    hyper = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, blocksize=blocksize)
    order = ("param", "grad", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax")
    adamw8bit_update_triton(*(mine[k] for k in order), signed, unsigned, **hyper)
    reference.adamw8bit_update_(*(state[k] for k in order), signed, unsigned, **hyper)
    codes_differ = sum((mine[k] != state[k]).sum().item() for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"))
    param_err = _rel_err(mine["param"], state["param"])
    return codes_differ == 0 and param_err < 1e-6, f"{codes_differ} codes/absmax differ, parameter relative error {param_err:.1e}"


CHECKS = {"dequantize": _check_dequantize, "gemv": _product_check(_gemv, 3), "fused": _product_check(_fused, 20),
          "adamw8bit": _check_adamw8bit}
