"""Triton kernels for GPTQ weights: dequantize, and the fused products X W^T (forward) and dY W
(backward) that decode W tiles inside the K (or N) loop, for 2/3/4/8 bits with group scales/zeros
and g_idx. PyTorch twins: gptq_reference.py.

Decoding one element (k, n) of W^T, for any width: its value starts at bit k*bits of qweight's
column n (a little-endian stream of int32 words, gptq_format.py), so
    word = (k*bits) >> 5, shift = (k*bits) & 31, q = (w[word] >> shift | w[word+1] << (32 - shift)) & mask,
the second word only where shift + bits > 32 (3 bits: values 10 and 21 of every 32). Shifts are on
uint32 (logical), and a shift by 32 never happens (it is undefined on GPUs): the high part is
selected away instead. The zero of (g, n) is decoded the same way along row g of qzeros, plus
zero_offset (1 for v1). The product scale * (q - z) is formed in fp32, as in the twin, so both
paths decode W to the same values before any rounding to the compute dtype.

An act-order weight is held with K sorted by group (perm); the launchers gather x by perm before
the forward and scatter dX back after the backward, on the torch side: one [M, K] copy each.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qlora.kernels.gptq_format import PackedGPTQ
from qlora.kernels.launch import launch



@triton.jit
def _decode_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, weight_words, zero_words,
                 BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """W^T[offs_k, offs_n] as fp32 [BLOCK_K, BLOCK_N] (0 outside the weight)."""
    mask_k, mask_n = offs_k < K, offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    mask_bits: tl.constexpr = (1 << BITS) - 1
    # the code q[k, n] from qweight [weight_words, N]
    start = offs_k * BITS
    word, shift = start >> 5, (start & 31).to(tl.uint32)
    low = tl.load(qweight_ptr + word[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    code = low >> shift[:, None]
    if BITS == 3:  # only 3 bits straddle words (gptq_format.py)
        straddles = (shift + BITS) > 32
        high = tl.load(qweight_ptr + (word + 1)[:, None] * N + offs_n[None, :],
                       mask=mask & straddles[:, None] & ((word + 1) < weight_words)[:, None], other=0)
        high_shift = tl.where(straddles, 32 - shift, 0).to(tl.uint32)
        code = code | tl.where(straddles[:, None], high.to(tl.uint32, bitcast=True) << high_shift[:, None], 0)
    code = (code & mask_bits).to(tl.int32)
    # the zero z[g, n] from qzeros [groups, zero_words], g = g_idx[k]
    group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
    zstart = offs_n * BITS
    zword, zshift = zstart >> 5, (zstart & 31).to(tl.uint32)
    zlow = tl.load(qzeros_ptr + group[:, None] * zero_words + zword[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    zero = zlow >> zshift[None, :]
    if BITS == 3:
        zstraddles = (zshift + BITS) > 32
        zhigh = tl.load(qzeros_ptr + group[:, None] * zero_words + (zword + 1)[None, :],
                        mask=mask & zstraddles[None, :] & ((zword + 1) < zero_words)[None, :], other=0)
        zhigh_shift = tl.where(zstraddles, 32 - zshift, 0).to(tl.uint32)
        zero = zero | tl.where(zstraddles[None, :], zhigh.to(tl.uint32, bitcast=True) << zhigh_shift[None, :], 0)
    zero = (zero & mask_bits).to(tl.int32) + ZERO_OFFSET
    scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, scale * (code - zero).to(tl.float32), 0.0)


@triton.jit
def _dequantize_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, out_ptr, K, N, weight_words, zero_words,
                       BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_PERM: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    values = _decode_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, weight_words, zero_words,
                          BITS, ZERO_OFFSET)
    mask_k = offs_k < K
    column = tl.load(perm_ptr + offs_k, mask=mask_k, other=0) if HAS_PERM else offs_k  # W [N, K], checkpoint order
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_n[None, :].to(tl.int64) * K + column[:, None], values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(a_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr, M, K, N, weight_words,
                    zero_words, stride_am, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [M, N] = a [M, K] @ W^T (+ bias), W^T tiles decoded in the K loop; fp32 accumulation."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _decode_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, weight_words,
                         zero_words, BITS, ZERO_OFFSET)
        acc += tl.dot(a, w.to(a.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(g_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, M, K, N, weight_words, zero_words,
                     stride_gm, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [M, K] = g [M, N] @ W [N, K], reducing over N with W^T tiles decoded and transposed."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :],
                    mask=(offs_m < M)[:, None] & (offs_n < N)[None, :], other=0.0)
        w = _decode_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, weight_words,
                         zero_words, BITS, ZERO_OFFSET)
        acc += tl.dot(g, tl.trans(w.to(g.dtype)))
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64  # tl.dot needs >= 16 rows; bucketed so M does not recompile


def dequantize_gptq_triton(weight: PackedGPTQ, dtype: torch.dtype) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    perm = weight.perm if weight.perm is not None else weight.g_idx  # any int tensor: unread without HAS_PERM
    block_k, block_n = 32, 64
    launch(_dequantize_kernel, (triton.cdiv(k, block_k), triton.cdiv(n, block_n)), weight.qweight, weight.qzeros,
           weight.scales, weight.g_idx, perm, out, k, n, weight.qweight.shape[0], weight.qzeros.shape[1],
           BITS=weight.bits, ZERO_OFFSET=weight.zero_offset, HAS_PERM=weight.perm is not None,
           BLOCK_K=block_k, BLOCK_N=block_n, enable_fp_fusion=False)  # W decoded as the twin rounds it
    return out


def matmul_gptq_forward(a: torch.Tensor, weight: PackedGPTQ, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """a [M, K] @ W^T (+ bias) in a's dtype."""
    n, k = weight.shape
    if weight.perm is not None:
        a = a[:, weight.perm]  # held channel order
    if a.stride(1) != 1:
        a = a.contiguous()
    m = a.shape[0]
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    block_m, block_n, block_k = _block_m(m), 64, 32
    launch(_forward_kernel, (triton.cdiv(m, block_m), triton.cdiv(n, block_n)), a, weight.qweight, weight.qzeros,
           weight.scales, weight.g_idx, bias if bias is not None else out, out, m, k, n, weight.qweight.shape[0],
           weight.qzeros.shape[1], a.stride(0), BITS=weight.bits, ZERO_OFFSET=weight.zero_offset,
           HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, enable_fp_fusion=False)
    return out


def matmul_gptq_backward(grad: torch.Tensor, weight: PackedGPTQ) -> torch.Tensor:
    """grad [M, N] @ W [N, K] in grad's dtype, channels in the checkpoint order."""
    n, k = weight.shape
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    m = grad.shape[0]
    out = torch.empty(m, k, dtype=grad.dtype, device=grad.device)
    if m == 0:
        return out
    block_m, block_k, block_n = _block_m(m), 64, 32
    launch(_backward_kernel, (triton.cdiv(m, block_m), triton.cdiv(k, block_k)), grad, weight.qweight, weight.qzeros,
           weight.scales, weight.g_idx, out, m, k, n, weight.qweight.shape[0], weight.qzeros.shape[1], grad.stride(0),
           BITS=weight.bits, ZERO_OFFSET=weight.zero_offset, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
           enable_fp_fusion=False)
    if weight.perm is not None:
        original = torch.empty_like(out)
        original[:, weight.perm] = out
        out = original
    return out
