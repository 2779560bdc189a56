"""The fast CPU path of the fused 8-bit AdamW step: one C pass per quantization block (cpu.c, built by
kernels/native.py), blocks split over torch.get_num_threads() threads.

Bit for bit the twin (reference.adamw8bit_update_): the codes, the absmax and the parameter, with
the same fp32 roundings torch's CPU kernels make (listed in cpu.c). What differs is cost: the twin
makes ~20 passes over n in fp32 temporaries (decode, lerp, mul, addcmul, sqrt, div, add, addcdiv,
two quantizes of pad, abs, amax, divide, bucketize, cast, copy); this reads each element's state once
and writes it once, with the moments of one block (at most 4096 values) in a stack buffer.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from qlora.kernels import native
from qlora.kernels.optim.checks import AdamW8bitHyper, AdamW8bitTensors
from qlora.kernels.optim.reference import code_midpoints, lerp_from_end, step_scalars

SOURCE = Path(__file__).with_name("cpu.c")
_TABLE = (native.PTR, native.PTR, native.PTR, native.I64, native.INT, native.INT)  # a NearestTable's fields
SIGNATURES = {
    "qlora_adamw8bit_step": (
        native.PTR, native.INT, native.PTR, native.INT,  # param and its dtype kind, grad and its kind
        native.PTR, native.PTR, native.PTR, native.PTR,  # exp_avg, its absmax, exp_avg_sq, its absmax
        native.PTR, native.PTR, *_TABLE, *_TABLE,  # the signed and unsigned codes, their nearest tables
        native.I64, native.I64, native.I64, native.I64,  # numel, blocksize, first and last block
        native.FLOAT, native.INT, *(native.FLOAT,) * 6,  # step_scalars() with the lerp switch after the weight
        native.PTR, native.I64),  # torch's sqrt (or NULL) and its mode
}
# MKL's vector math mode as torch's ATen/cpu/vml.h passes it: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
MKL_SQRT_MODE = 0x2 | 0x140000 | 0x100
# Blocks per thread below which one thread steps alone: 64 blocks of 256 = 16K elements, ~30 us.
MIN_BLOCKS_PER_THREAD = 64


def library() -> Optional[ctypes.CDLL]:
    """The built step kernel, or None where no C compiler is available (warned once)."""
    return native.library(SOURCE, SIGNATURES)


def available() -> bool:
    return library() is not None


class NearestTable(NamedTuple):
    """The bucket table cpu.c finds a code's nearest index with (see NearestTable there)."""
    first: torch.Tensor  # uint8 [buckets + 3]: midpoints below each bucket's smallest value
    threshold: torch.Tensor  # fp32 [buckets]: midpoints[first], the one midpoint that may fall inside
    midpoints: torch.Tensor  # fp32 [256 + extra]: the 255 midpoints, then +inf
    shift: int
    extra: int


KEY_OFFSET = 0x3F800001  # cpu.c: minus the sign-folded key of -1.0f
# Coarsest bucket width tried first: 2^19 keys = 4 mantissa bits per binade, 4066 buckets (4 KB + 16 KB).
COARSEST_SHIFT, FINEST_SHIFT = 19, 14
_TABLES: dict[int, tuple[torch.Tensor, int, NearestTable]] = {}


def nearest_table(code: torch.Tensor) -> NearestTable:
    """The bucket table of a sorted 256-value code: the coarsest bucket width (fewest bytes in cache) at
    which no bucket holds more than one midpoint, else the finest tried and `extra` compares. For the
    dynamic maps 2^16 keys (32514 buckets, 160 KB, of which a step touches the binades its values
    reach): signed needs 2^17, unsigned 2^16 (measured: 2^17 leaves 8 buckets with two midpoints)."""
    cached = _TABLES.get(id(code))
    if cached is not None and cached[0] is code and cached[1] == code._version:
        return cached[2]
    midpoints = code_midpoints(code)[:255]  # the twin's expression
    for shift in range(COARSEST_SHIFT, FINEST_SHIFT - 1, -1):
        buckets = ((0x3F800000 + KEY_OFFSET) >> shift) + 1
        keys = (torch.arange(buckets, dtype=torch.int64) << shift) - KEY_OFFSET
        keys = keys.clamp(max=0x3F800000).to(torch.int32)
        smallest = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys).view(torch.float32)  # each bucket's smallest value
        first = torch.searchsorted(midpoints, smallest)  # midpoints strictly below it
        # A value of bucket b is below bucket b + 1's smallest (or is at most 1.0 in the last one).
        upper = torch.cat((first[1:], torch.searchsorted(midpoints, torch.tensor([1.0]), right=True)))
        most = int((upper - first).max())
        if most <= 1:
            break
    padded = torch.cat((midpoints, midpoints.new_full((1 + max(most - 1, 0),), float("inf"))))
    table = NearestTable(torch.cat((first.to(torch.uint8), first.new_zeros(3, dtype=torch.uint8))),
                         padded[first].contiguous(), padded.contiguous(), shift, max(most - 1, 0))
    if len(_TABLES) >= 16:
        _TABLES.clear()
    _TABLES[id(code)] = (code, code._version, table)
    return table


class TorchSqrt(NamedTuple):
    """How torch computes Tensor.sqrt in fp32 here: `function` (an address) and `mode` for the kernel, or
    function 0 where it is the IEEE square root; `exact` False where neither matched, so the parameter
    may differ from the twin's by an fp32 rounding (the codes and absmax never depend on it).
    `one_thread`: MKL_Set_Num_Threads_Local, which each caller of the kernel sets to 1 around
    it: MKL would otherwise open an OpenMP team inside every 256-element call, and two of our threads
    doing so spin against each other (measured: 8M elements on 2 threads, 625 ms instead of 43)."""
    function: int
    mode: int
    exact: bool
    name: str
    one_thread: Optional[Callable[[int], int]] = None


def _sqrt_probe() -> torch.Tensor:
    # Uniform values across every exponent a second moment takes (1e-30 .. 1e4), and the squares of
    # floats with short mantissas, where a root is exact or a tie is near.
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(1 << 16, generator=g) * torch.pow(10.0, torch.randint(-30, 5, (1 << 16,), generator=g).float())
    exact = torch.arange(1, 4097, dtype=torch.float32) ** 2
    return torch.cat((spread, exact, exact + 1, torch.tensor([0.0, 1e-45, 3e38, float("inf")])))


@functools.cache
def torch_sqrt() -> TorchSqrt:
    """Which fp32 square root torch's CPU Tensor.sqrt is, found once by comparing on a probe set:
    the IEEE one (torch without MKL: Vectorized::sqrt, sqrtps / fsqrt), or MKL's vmsSqrt in torch's
    high-accuracy mode, called from torch's own library (torch with MKL on x86)."""
    probe = _sqrt_probe()
    want = probe.sqrt()
    if torch.equal(want, probe.double().sqrt().float()):
        return TorchSqrt(0, 0, True, "IEEE sqrt")
    mkl = _mkl()
    if mkl is not None:
        function, one_thread = mkl
        got = torch.empty_like(probe)
        ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(function)(
            probe.numel(), probe.data_ptr(), got.data_ptr(), MKL_SQRT_MODE)
        if torch.equal(got, want):
            return TorchSqrt(function, MKL_SQRT_MODE, True, "MKL vmsSqrt (as torch)", one_thread)
    return TorchSqrt(0, 0, False, "IEEE sqrt (torch's differs: the parameter within one fp32 rounding)")


def _mkl() -> Optional[tuple[int, Callable[[int], int]]]:
    """(address of vmsSqrt, MKL_Set_Num_Threads_Local) from torch's CPU library, where torch links MKL
    and exports them."""
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            lib = ctypes.CDLL(str(path))
            one_thread = lib.MKL_Set_Num_Threads_Local  # the C entry (mkl_set_num_threads_local is the Fortran one)
            one_thread.argtypes, one_thread.restype = (ctypes.c_int,), ctypes.c_int
            return ctypes.cast(lib.vmsSqrt, ctypes.c_void_p).value, one_thread
        except (OSError, AttributeError):
            continue
    return None


def adamw8bit_update_cpu(tensors: AdamW8bitTensors, hyper: AdamW8bitHyper) -> None:
    """reference.adamw8bit_update_ in one fused pass: param, both moments and their absmax in place.
    The arguments are checked by the caller (checks.check_adamw8bit_args); blocksize <= 4096 there,
    the kernel's stack buffers."""
    lib = library()
    param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_code, unsigned_code = tensors
    numel, blocksize = param.numel(), hyper.blocksize
    if numel == 0:
        return
    # The Python scalars as the twin's tensor ops see them: float64 on the host, one rounding to fp32
    # when passed (ctypes.c_float rounds to nearest, as torch does).
    lerp_weight, beta2, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps = step_scalars(hyper)
    # Both tables are held here until the kernel returns: the second lookup may evict the first from
    # the cache, and the kernel reads them through bare pointers.
    tables = [nearest_table(code) for code in (signed_code, unsigned_code)]
    table_args = [arg for table in tables for arg in (table.first.data_ptr(), table.threshold.data_ptr(),
                                                      table.midpoints.data_ptr(), table.threshold.numel(),
                                                      table.shift, table.extra)]
    pointers = [t.data_ptr() for t in (param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax,
                                       signed_code, unsigned_code)] + table_args
    kinds = native.DTYPE_KIND[param.dtype], native.DTYPE_KIND[grad.dtype]
    root = torch_sqrt()
    scalars = (lerp_weight, int(lerp_from_end(lerp_weight)), beta2, one_minus_beta2, decay, step_size,
               bias_correction2_sqrt, eps, root.function or None, root.mode)

    def run(first: int, last: int) -> None:
        before = root.one_thread(1) if root.one_thread else None
        try:
            lib.qlora_adamw8bit_step(pointers[0], kinds[0], pointers[1], kinds[1], *pointers[2:], numel, blocksize,
                                     first, last, *scalars)
        finally:
            if before is not None:
                root.one_thread(before)  # 0, this thread's usual "follow the global setting"

    native.parallel_ranges(run, -(-numel // blocksize), MIN_BLOCKS_PER_THREAD)
