"""Which implementation runs: the Triton kernels, the CPU kernels or the pure-PyTorch reference.

`QLORA_BACKEND=auto|torch|triton|cpu` (read at every call, so a test can change it) or `set_backend()`:
- auto (the default): Triton for CUDA tensors on GPUs of compute capability 8.0 or newer (A100,
  RTX 30xx/40xx, A10, L4, H100, H200: the architectures the kernels are compiled and checked for);
  the CPU kernels (C, built on first use by kernels/native.py) for CPU tensors where a C compiler
  is found; the reference everywhere else (older GPUs, no triton, no C compiler: warned once);
- torch: the reference everywhere (the bit-exact oracle, and the fallback if a kernel misbehaves);
- cpu: the CPU kernels for CPU tensors, an error where they cannot be built (the reference on
  other devices);
- triton: the Triton kernels everywhere; on CPU that needs `TRITON_INTERPRET=1` set before
  triton is first imported (the interpreter is chosen when a kernel is decorated), which is how the
  CPU tests run the kernel code.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cpu")
DEFAULT_BACKEND = "auto"
# Below 8.0 (T4, V100) Triton has no bf16 and the fused kernel compiles to spilling code without
# tensor cores (sm_75, checked with launch.compile_only).
MIN_AUTO_CAPABILITY = (8, 0)
_override: Optional[str] = None


class BackendError(RuntimeError):
    """QLORA_BACKEND (or set_backend) names a backend that cannot run here; the message says what to
    set instead. The commands print it as one line, like every other error caused by input."""


class UnknownBackendError(BackendError, ValueError):
    """QLORA_BACKEND is not one of the backends (a ValueError, as a bad value is)."""


def set_backend(backend: Optional[str]) -> None:
    """Force a backend for this process; None goes back to the QLORA_BACKEND environment variable."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    global _override
    _override = backend


def get_backend() -> str:
    backend = _override if _override is not None else os.environ.get("QLORA_BACKEND", DEFAULT_BACKEND).strip().lower() or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise UnknownBackendError(f"QLORA_BACKEND must be one of auto, torch, triton, cpu, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(device: torch.device) -> bool:
    """True when the Triton kernels should run for tensors on `device`; raises if forced but impossible."""
    backend = get_backend()
    if backend in ("torch", "cpu"):
        return False
    if backend == "auto":
        return (device.type == "cuda" and importlib.util.find_spec("triton") is not None
                and compute_capability(device) >= MIN_AUTO_CAPABILITY)
    if importlib.util.find_spec("triton") is None:
        raise BackendError("QLORA_BACKEND=triton but triton is not installed; pip install triton or use QLORA_BACKEND=torch")
    if device.type == "cuda":
        return True
    if device.type == "cpu" and interpreter_enabled():
        return True
    raise BackendError(
        f"QLORA_BACKEND=triton cannot run on {device.type} tensors: the kernels need CUDA, or on CPU the "
        "Triton interpreter (set TRITON_INTERPRET=1 before importing triton); or use QLORA_BACKEND=torch"
    )


def use_cpu_kernels(device: torch.device, available) -> bool:
    """True when the C kernels should run for tensors on `device`; `available()` says whether the
    calling family's kernels are built here (building them on first call). Raises if forced but
    impossible."""
    if device.type != "cpu":
        return False
    backend = get_backend()
    if backend == "auto":
        return available()
    if backend != "cpu":
        return False
    if not available():
        from qlora.kernels import native

        raise BackendError(f"QLORA_BACKEND=cpu but the CPU kernels cannot be built here "
                           f"({'; '.join(native.failures().values()) or 'no C compiler'}); install gcc or clang, "
                           "or use QLORA_BACKEND=torch")
    return True


def call_directly(a: torch.Tensor) -> bool:
    """True where an op's implementation may run as a plain Python call instead of through its
    torch.library custom op: `a` a plain CPU tensor, no torch.compile tracing and no dispatch mode
    (make_fx, FakeTensorMode, FlopCounterMode) that must see the op whole. The dispatcher's Python
    layers cost ~70 us a call, about as much as decoding and multiplying a 256x256 layer on CPU,
    where a small model makes ~80 such calls a training step. CUDA tensors keep the op: there the
    call overlaps the GPU's work."""
    return (type(a) is torch.Tensor and a.device.type == "cpu" and not torch.compiler.is_compiling()
            and not _in_dispatch_mode())


try:  # looked up once: call_directly runs on every 4-bit matmul
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _in_dispatch_mode
except ImportError:  # a torch without it: always the op
    def _in_dispatch_mode() -> bool:
        return True


def compute_capability(device: torch.device) -> tuple[int, int]:
    # torch caches device properties: a lookup, not a device sync.
    return torch.cuda.get_device_capability(device)
