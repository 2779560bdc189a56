"""Every Triton kernel of this package is launched through `launch`, so a process without a GPU can
compile the real launches for a CUDA architecture and inspect the machine code.

    with compile_only(90) as compiled:        # sm_90 = H100/H200; 80 = A100
        dequantize_4bit(packed_cpu, ...)      # the usual launcher, on CPU tensors of the real dtypes
    compiled[0].kernel.asm["cubin"]           # what an H100 would load

Inside the block a launch runs Triton's own front end (argument specialisation, constexprs,
options) and compiler for the chosen target, and returns without running anything: the output
tensors stay unwritten. It rests on Triton's extension points only: a driver (DriverBase) set as
active, and JITFunction.warmup, which compiles a launch without executing it. The compiler and
ptxas ship in the triton wheel, so no CUDA toolkit or driver is needed. The kernels' GPU-only
failure modes (tl.dot operand layouts, register spills, shared memory limits, tensor-core
lowering) are then testable on CPU, where the interpreter cannot see them.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator

_COMPILED: contextvars.ContextVar[list | None] = contextvars.ContextVar("qlora_compile_only", default=None)
_TARGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("qlora_compile_only_arch", default=None)


@dataclass
class CompiledLaunch:
    name: str  # the kernel function's name
    constexprs: dict  # the compile-time arguments the launcher chose (block sizes, flags)
    kernel: Any  # triton.compiler.CompiledKernel: .asm["ptx" | "cubin"], .metadata


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) under the tensors' CUDA device, or inside compile_only():
    compile it for that target and record it."""
    compiled = _COMPILED.get()
    if compiled is None:
        # Triton launches on torch's *current* device and stream. A layer on cuda:1 called while
        # cuda:0 is current would read cuda:1 pointers from a cuda:0 kernel: an illegal address, or
        # wrong results under peer access. So the launch runs under the tensors' device guard.
        device = launch_device(args)
        if device is None or device.type != "cuda":
            return kernel[grid](*args, **kwargs)
        import torch

        with torch.cuda.device(device):
            return kernel[grid](*args, **kwargs)
    result = kernel.warmup(*args, grid=grid, **kwargs)
    names = [p.name for p in kernel.params]
    bound = dict(zip(names, args)) | kwargs
    constexprs = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr and p.name in bound}
    compiled.append(CompiledLaunch(kernel.fn.__name__, constexprs, result))
    return result


def launch_device(args):
    """The device of the first tensor argument (the launchers check that all share it), or None."""
    import torch

    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return None


def target_arch(device) -> int:
    """The CUDA architecture a launch on `device` compiles for: sm_<arch> as an int (90 = H100).

    Inside compile_only() it is that block's target; on a CUDA device its compute capability; on
    CPU (the interpreter) 90, so the interpreter runs the tile choices of an H100, or inside
    interpreted_as() that block's arch.
    """
    compiling = _TARGET.get()
    if compiling is not None:
        return compiling
    if getattr(device, "type", None) == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _compile_only_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """Answers Triton's questions about 'the current GPU' with a fixed CUDA target; never launches."""

        @classmethod
        def is_active(cls):
            return False  # never picked on its own; only ever set active explicitly

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("compile_only() compiles kernels; it cannot time them")

        def get_current_device(self):
            # A key of its own in Triton's per-device caches, so nothing compiled here is ever
            # found by a real launch on a GPU of this process, and the reverse.
            return f"compile-only-sm{arch}"

        def get_current_stream(self, device=None):
            return 0

    return CompileOnlyDriver()


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list[CompiledLaunch]]:
    """Within the block, kernel launches compile for sm_<arch> and run nothing; yields what was compiled."""
    from triton import knobs
    from triton.runtime import driver

    if knobs.runtime.interpret:
        raise RuntimeError("compile_only() needs real compilation, but TRITON_INTERPRET=1 is set in this process")
    if _COMPILED.get() is not None:
        raise RuntimeError("compile_only() blocks do not nest")
    try:
        previous = driver.active  # a real GPU's driver, if this process has one
    except RuntimeError:  # no GPU: Triton finds no active driver
        previous = None
    compiled: list[CompiledLaunch] = []
    token = _COMPILED.set(compiled)
    arch_token = _TARGET.set(arch)
    driver.set_active(_compile_only_driver(arch))
    try:
        yield compiled
    finally:
        driver.set_active(previous)  # None: the next real launch looks for a GPU again
        _TARGET.reset(arch_token)
        _COMPILED.reset(token)


@contextlib.contextmanager
def interpreted_as(arch: int) -> Iterator[None]:
    """Within the block, launches under TRITON_INTERPRET=1 take sm_<arch>'s tile choices and loop flags
    (target_arch) rather than the H100's, so the interpreter checks what each arch's launch computes."""
    from triton import knobs

    if not knobs.runtime.interpret:
        raise RuntimeError("interpreted_as() picks the arch of interpreted launches; TRITON_INTERPRET=1 is not set "
                           "(compile_only() compiles for an arch)")
    token = _TARGET.set(arch)
    try:
        yield
    finally:
        _TARGET.reset(token)
