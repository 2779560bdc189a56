"""The fast CPU path of the GPTQ ops: the decode in C (cpu.c) into W^T, the products by torch.

2, 4 and 8 bits (a value never crosses a word); 3 bits stays on the twin. The decoded W^T is the
twin's bytes (reference.dequantize_transposed_torch, then one rounding), and the products take it
as it lies: forward X @ W^T, backward dY @ (W^T)^T, so no transposed copy is made. With an
act-order permutation the decoded rows are put back in the original channel order first.

PyTorch's own CPU int4 GEMM (torch.ops.aten._weight_int4pack_mm_for_cpu) was measured against
this for the forward (benchmarks/linear_cpu.py): it needs its own packing and bf16 scale/zero
pairs, so its W is not the format's W to the bit, and it has no backward; see docs/kernels.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from qlora.kernels import native
from qlora.kernels.gptq.format import PackedGPTQ

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = {"qlora_dequantize_gptq_t": (native.PTR, native.PTR, native.PTR, native.PTR, native.I64, native.I64,
                                          native.I64, native.I64, native.I64, native.PTR, native.INT)}
BITS = (2, 4, 8)
# Rows of W^T per thread below which one thread decodes alone (64 rows of 4096: ~0.1 ms).
MIN_ROWS_PER_THREAD = 64


def available() -> bool:
    return native.library(SOURCE, SIGNATURES) is not None


def supports(weight: PackedGPTQ) -> bool:
    return weight.bits in BITS


def dequantize_transposed_cpu(weight: PackedGPTQ, dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in `dtype`, input channels in the original order."""
    lib = native.library(SOURCE, SIGNATURES)
    n, k = weight.shape
    qweight, qzeros = weight.qweight.contiguous(), weight.qzeros.contiguous()
    scales, g_idx = weight.scales.float().contiguous(), weight.g_idx.to(torch.int32).contiguous()
    held = native.empty_output((k, n), dtype)
    args = (qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), g_idx.data_ptr(), weight.bits,
            weight.zero_offset, n)

    def decode(first: int, last: int) -> None:
        lib.qlora_dequantize_gptq_t(*args, first, last, held.data_ptr(), native.DTYPE_KIND[dtype])

    native.parallel_ranges(decode, k, MIN_ROWS_PER_THREAD)
    if weight.perm is None:
        return held
    return torch.empty_like(held).index_copy_(0, weight.perm, held)


def dequantize_gptq_cpu(weight: PackedGPTQ, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) [N, K] in `dtype`: the twin's bytes."""
    return dequantize_transposed_cpu(weight, dtype).t().contiguous()


def matmul_gptq_cpu(a: torch.Tensor, weight: PackedGPTQ, bias: Optional[torch.Tensor], transpose_weight: bool) -> torch.Tensor:
    """a @ W^T (+ bias) if transpose_weight, else a @ W; in a's dtype."""
    transposed = dequantize_transposed_cpu(weight, a.dtype)
    if transpose_weight:
        out = a @ transposed
        return out if bias is None else out + bias.to(a.dtype)
    return a @ transposed.t()
