"""The self-check on first use: before a Triton path first runs on a (device, dtype), it runs once
on a small problem against the PyTorch twin. If the result is wrong it warns once, naming the path
and the device, and that path falls back to the twin for the rest of the process: a training run
never goes on with a silently wrong kernel on a GPU this project could not test on.

This module is the mechanism; each kernel family registers its checks (`register`) in its own
folder: nf4/selfcheck.py ("dequantize" bit-exact against the twin; "gemv" and "fused", forward and
backward products against the twin's product on the same dequantized W, relative error within the
dtype's tolerance; "dequant_matmul" is the dequantize kernel then torch, so its check is
"dequantize"'s) and optim/selfcheck.py ("adamw8bit": codes and absmax bit-exact, the parameter
within an fp32 rounding). Each check is one small launch per kernel and a comparison: a few
milliseconds on a GPU (the first compile of a kernel is paid by the real call anyway), logged at
INFO on the "qlora.kernels" logger with its cost.

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

log = logging.getLogger("qlora.kernels")
# Relative error of a product against the twin's on the same dequantized W: fp32 products differ by
# ~1e-7 (summation order), 16-bit outputs by one rounding (2^-11 fp16, 2^-8 bf16) plus the sum.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
_RESULTS: dict[tuple[str, str, torch.dtype], bool] = {}
# path -> check(device, dtype) -> (passed, detail); path -> the path whose check covers it.
CHECKS: dict[str, Callable[[torch.device, torch.dtype], tuple[bool, str]]] = {}
ALIASES: dict[str, str] = {}


def register(path: str, covers: tuple[str, ...] = ()):
    """Decorator: `check(device, dtype) -> (passed, detail)` is the self-check of `path` (and of the
    paths in `covers`, which run no kernel of their own)."""
    def add(check):
        CHECKS[path] = check
        ALIASES.update({alias: path for alias in covers})
        return check
    return add


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
    path = ALIASES.get(path, path)
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
        kind = "CPU" if path.startswith("cpu_") else "Triton"
        warnings.warn(f"the {kind} {path} kernel gave a wrong result on {device} ({dtype}): {detail}; "
                      "using the PyTorch reference for it from now on. Please report this with the output "
                      "of `qlora doctor`", RuntimeWarning, stacklevel=3)
    return ok


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error in fp64; inf where `got` has a non-finite value."""
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
