"""Pure-PyTorch twins of the GPTQ kernels: the CPU path and the oracle the Triton kernels are tested against.

Dequantize: W^T[k, n] = scales[g, n] * (q[k, n] - (z[g, n] + zero_offset)), g = g_idx[k]. The
product is formed in fp32, where it is exact (an fp16 scale has 11 significant bits and q - z at
most 9), so a cast to fp16 rounds once, as GPTQModel's fp16 arithmetic does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from qlora.kernels.gptq.format import PackedGPTQ, unpack


def dequantize_transposed_torch(weight: PackedGPTQ) -> torch.Tensor:
    """W^T [K, N] in fp32, in the held channel order (permuted when weight.perm is set)."""
    n, k = weight.shape
    q = unpack(weight.qweight, weight.bits, k, dim=0)  # [K, N]
    zeros = unpack(weight.qzeros, weight.bits, n, dim=1) + weight.zero_offset  # [groups, N]
    g_idx = weight.g_idx.long()
    return weight.scales.float()[g_idx] * (q - zeros[g_idx]).float()


def dequantize_gptq_torch(weight: PackedGPTQ, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) [N, K] in `dtype`, channels in the original (checkpoint) order."""
    held = dequantize_transposed_torch(weight).t()
    if weight.perm is not None:
        original = torch.empty_like(held)
        original[:, weight.perm] = held
        held = original
    return held.to(dtype).contiguous()


def matmul_gptq_torch(a: torch.Tensor, weight: PackedGPTQ, bias: Optional[torch.Tensor],
                      transpose_weight: bool) -> torch.Tensor:
    """a [M, K] @ W^T (+ bias) if transpose_weight, else a [M, N] @ W; in a's dtype."""
    dense = dequantize_gptq_torch(weight, a.dtype)
    if transpose_weight:
        return F.linear(a, dense, bias)
    return a @ dense
