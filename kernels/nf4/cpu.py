"""The fast CPU path of the 4-bit ops: the decode in C (cpu.c, built by kernels/native.py), the
products by torch (oneDNN: AVX-512 / AMX bf16 where the CPU has them).

Bit for bit the twin (reference.dequantize_4bit_torch): the same fp32 scales, the same fp32 products,
one round to nearest even into the output dtype. What it does differently is cost: per block the 16
code values are scaled and converted once and each byte becomes two table loads (the twin gathers
a byte-pair table into fp32, scales all n values and casts them: four passes over n); measured on
a 4096x4096 NF4 + DQ weight (2 threads, docs/kernels.md): twin 60 ms bf16, this path ~7 ms.

The product decodes W into the compute dtype and calls F.linear (forward) or mm (backward), so it
differs from the twin's product only by the summation order of torch's own matmul (the same call).
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from qlora.kernels import native
from qlora.kernels.nf4.packed import Packed4bit
from qlora.kernels.nf4.reference import as_bytes, linear_dequantized, linear_dequantized_grad_input

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = {
    "qlora_decode_absmax": (native.PTR, native.PTR, native.PTR, native.FLOAT, native.I64, native.I64, native.I64,
                            native.PTR),
    "qlora_dequantize_4bit": (native.PTR, native.PTR, native.PTR, native.I64, native.I64, native.I64, native.I64,
                              native.PTR, native.INT),
}
# Blocks per thread below which one thread decodes alone: 4096 blocks of 64 = 256K weights, ~100 us.
# Handing a range to a pool thread and joining it costs ~50-80 us beside torch's OpenMP team, so
# smaller splits lose (measured, 2 threads, bf16 out: 704 x 256 alone 68 us, split 113-145 us;
# 1024 x 1024 alone 345 us, split 275 us; 2048 x 2048 alone 1370 us, split 860 us).
MIN_BLOCKS_PER_THREAD = 4096


def library() -> Optional[ctypes.CDLL]:
    """The built decode kernels, or None where no C compiler is available (warned once)."""
    return native.library(SOURCE, SIGNATURES)


def available() -> bool:
    return library() is not None


def block_scales(weight: Packed4bit) -> torch.Tensor:
    """fp32 scale of every block; double-quantized absmax decoded in C (reference.decode_absmax's
    two roundings: code * nested_absmax, then + offset)."""
    if weight.nested_absmax is None:
        return weight.absmax.float().contiguous()
    lib = library()
    codes = weight.absmax.contiguous()
    nested_code = weight.nested_code.float().contiguous()
    nested_absmax = weight.nested_absmax.float().contiguous()
    offset = float(weight.offset)
    out = torch.empty(codes.numel(), dtype=torch.float32)
    lib.qlora_decode_absmax(codes.data_ptr(), nested_code.data_ptr(), nested_absmax.data_ptr(), offset,
                            weight.nested_blocksize, 0, codes.numel(), out.data_ptr())
    return out


def dequantize_4bit_cpu(weight: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) [out, in] in `dtype`: the twin's bytes."""
    lib = library()
    packed = as_bytes(weight.packed).contiguous()
    scales = block_scales(weight)
    code = weight.code.float().contiguous()
    out = native.empty_output(weight.shape, dtype)
    numel, blocksize, kind = weight.numel, weight.blocksize, native.DTYPE_KIND[dtype]
    args = (packed.data_ptr(), scales.data_ptr(), code.data_ptr(), numel, blocksize)

    def decode(first: int, last: int) -> None:
        lib.qlora_dequantize_4bit(*args, first, last, out.data_ptr(), kind)

    native.parallel_ranges(decode, scales.numel(), MIN_BLOCKS_PER_THREAD)
    return out


def matmul_4bit_cpu(a: torch.Tensor, weight: Packed4bit, bias: Optional[torch.Tensor], transpose_weight: bool) -> torch.Tensor:
    """a @ W^T (+ bias) if transpose_weight, else a @ W, in a's dtype: the twin's call on the same W."""
    dense = dequantize_4bit_cpu(weight, a.dtype)
    if transpose_weight:
        return linear_dequantized(a, dense, bias)
    return linear_dequantized_grad_input(a, dense)


# ---- the quantize ---------------------------------------------------------------------------------
QUANTIZE_SOURCE = Path(__file__).with_name("cpu_quantize.c")
QUANTIZE_SIGNATURES = {
    "qlora_quantize_4bit": (native.PTR, native.INT, native.I64, native.I64, native.I64, native.I64, native.PTR,
                            native.PTR, native.FLOAT, native.PTR, native.PTR),
}
# The twin's clamp of absmax before its reciprocal (qlora/quant/nf4/quantize.py): fp32(1e-38), a subnormal.
MIN_ABSMAX = 1e-38


def quantize_available() -> bool:
    return native.library(QUANTIZE_SOURCE, QUANTIZE_SIGNATURES) is not None


def quantize_4bit_cpu(w: torch.Tensor, blocksize: int, midpoints: torch.Tensor,
                      order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (fp32/bf16/fp16, any shape) -> (packed uint8 [(n + 1) // 2], fp32 absmax [blocks]): the twin's
    bytes. `midpoints` are the 15 sorted code midpoints, `order` maps a sorted position to its code
    (qlora.quant.nf4.codes.quantize_bounds)."""
    lib = native.library(QUANTIZE_SOURCE, QUANTIZE_SIGNATURES)
    flat = w.reshape(-1).contiguous()
    numel = flat.numel()
    blocks = -(-numel // blocksize)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(blocks, dtype=torch.float32)
    midpoints = midpoints.float().contiguous()
    order = order.to(torch.uint8).contiguous()
    args = (flat.data_ptr(), native.DTYPE_KIND[flat.dtype], numel, blocksize)

    def quantize(first: int, last: int) -> None:
        lib.qlora_quantize_4bit(*args, first, last, midpoints.data_ptr(), order.data_ptr(), MIN_ABSMAX,
                                packed.data_ptr(), absmax.data_ptr())

    native.parallel_ranges(quantize, blocks, MIN_BLOCKS_PER_THREAD)
    return packed, absmax
