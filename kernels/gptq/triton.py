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

from qlora.kernels.gptq.format import PackedGPTQ
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
def _store_rows(ptr, acc, offs_m, offs_c, M, C):
    """acc into rows offs_m, columns offs_c of a contiguous [M, C] output, in its dtype: the end of
    both products."""
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    tl.store(ptr + offs_m[:, None].to(tl.int64) * C + offs_c[None, :], acc.to(ptr.dtype.element_ty), mask=mask)


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
    _store_rows(out_ptr, acc, offs_m, offs_n, M, N)


@triton.jit
def _backward_kernel(g_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, M, K, N, weight_words, zero_words,
                     stride_gm, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [M, K] = g [M, N] @ W [N, K], reducing over N with W^T tiles decoded and transposed.

    The loop mirrors _forward_kernel's with the roles of K and N swapped, and stays written out:
    sharing the operand load through an inlined @triton.jit helper changed this kernel's machine
    code (sm_80 and sm_90, BLOCK_M 16: 552 SASS instructions instead of 544, measured), where the
    output store is shared (_store_rows) without changing a single instruction of either kernel."""
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
    _store_rows(out_ptr, acc, offs_m, offs_k, M, K)


@triton.jit
def _gemv_kernel(a_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, partial_ptr, M, K, N, zero_words, stride_am,
                 WORDS_PER_SPLIT, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """partial[split, M, N] = a[M, K of this split] @ W^T (2/4/8 bits): decode GEMV, fp32 throughout.

    One int32 word holds PER_WORD values of consecutive k in one column, so a [BLOCK_W, BLOCK_N]
    load of words (one load per PER_WORD weights) is expanded into a [BLOCK_W, PER_WORD, BLOCK_N]
    tile, against the matching [BLOCK_M, BLOCK_W, PER_WORD] slice of `a` (contiguous).
    Where every tile of the program's K range (BLOCK_W * PER_WORD = 32 values at M = 1) lies in one
    group (g_idx checked once, before the loop; so for group sizes 32, 64, 128 and -1) the tile
    column's scale s and zero z factor out of its products:
        sum_k a_k * s * (q_k - z) = s * (sum_k a_k * q_k - z * sum_k a_k),
    and a value is read where it sits: the word's upper half moved down once (a shift shared by the
    values there), the value masked in place at bit `place` < 16 and or-ed with 0x4B000000 is the
    fp32 2^23 + q * 2^place, so subtracting 2^23 gives q * 2^place exactly, and a is scaled by
    2^-place once per thread (shared by its 4 columns). A weight costs a mask, an or, a subtract and
    an FMA-tree share (6.7 instructions per weight in the sm_90 SASS at M = 1, where the fused
    kernel's rounded decode costs 20). ptxas keeps the mask and the or apart (two LOP3s) whatever
    the operand kinds tried (immediate, uniform or per-thread register masks): the next 1 per weight.
    So W is used exactly, in fp32, never rounded to the input dtype as tl.dot needs on the fused path
    (and as the dequantize path stores it): the GEMV is the most accurate path and differs from the
    others by at most that rounding (2^-9 of a weight in bf16). A K range with a tile across a group
    boundary takes a per-value loop instead. Partial sums go to a workspace that _reduce_kernel adds
    up (deterministic, no atomics).
    """
    PER_WORD: tl.constexpr = 32 // BITS
    mask_bits: tl.constexpr = (1 << BITS) - 1
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, PER_WORD)
    mask_m, mask_n = offs_m < M, offs_n < N
    zword, zshift = (offs_n * BITS) >> 5, ((offs_n * BITS) & 31).to(tl.uint32)
    a_rows2 = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    a_rows = a_rows2[:, :, None]
    # Value j of a word, read in place: the word's upper half is moved down once (shift by 16, shared
    # by the values there), then the value masked where it sits, at bit `place` < 16 of its half,
    # becomes the float 2^23 + q * 2^place; the matching a is scaled by 2^-place (exact).
    HALF: tl.constexpr = 16 // BITS
    halves = tl.where(offs_j >= HALF, 16, 0).to(tl.uint32)[None, :, None]
    place = (offs_j % HALF) * BITS
    place_masks = (mask_bits << place).to(tl.uint32)[None, :, None]
    a_scales = tl.exp2(-place.to(tl.float32))[None, None, :]
    w_start = split * WORDS_PER_SPLIT
    w_end = tl.minimum(w_start + WORDS_PER_SPLIT, tl.cdiv(K, PER_WORD))
    straddling = 0  # tiles of this range whose K values are not all in one group
    for w0 in range(w_start, w_end, BLOCK_W):
        offs_k = w0 * PER_WORD + tl.arange(0, BLOCK_W * PER_WORD)
        groups = tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0)
        straddling += tl.sum(tl.where((offs_k < K) & (groups != tl.load(g_idx_ptr + w0 * PER_WORD)), 1, 0))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if straddling == 0:  # one scale and zero per tile column
        # one word a thread per column (no vector load): a vector load's layout (4 columns a thread)
        # differs from the product's (columns t, t + 128, ...) and cost a shared-memory shuffle of the
        # whole decoded tile per trip (sm_90 SASS: 70 barriers a trip)
        word_cols = tl.max_contiguous(offs_n, 1)
        for w0 in range(w_start, w_end, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            offs_k = offs_w[:, None] * PER_WORD + offs_j[None, :]  # [BLOCK_W, PER_WORD]
            mask_w = offs_w * PER_WORD < K
            words = tl.load(qweight_ptr + offs_w[:, None, None] * N + word_cols[None, None, :],
                            mask=mask_w[:, None, None] & mask_n[None, None, :], other=0).to(tl.uint32, bitcast=True)
            group = tl.load(g_idx_ptr + w0 * PER_WORD)
            zero = tl.load(qzeros_ptr + group * zero_words + zword, mask=mask_n, other=0)
            zero = (((zero.to(tl.uint32, bitcast=True) >> zshift) & mask_bits) + ZERO_OFFSET).to(tl.float32)
            scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            code = ((words >> halves) & place_masks) | 0x4B000000  # [BLOCK_W, PER_WORD, BLOCK_N]
            q = code.to(tl.float32, bitcast=True) - 8388608.0  # q * 2^place, exact
            a = tl.load(a_rows + offs_k[None, :, :], mask=mask_m[:, None, None] & (offs_k < K)[None, :, :],
                        other=0.0).to(tl.float32)
            products = tl.sum(tl.reshape((a * a_scales)[:, :, :, None] * q[None, :, :, :],
                                         (BLOCK_M, BLOCK_W * PER_WORD, BLOCK_N)), axis=1)  # [BLOCK_M, BLOCK_N]
            a_sum = tl.sum(tl.reshape(a, (BLOCK_M, BLOCK_W * PER_WORD)), axis=1)
            acc += scale[None, :] * (products - zero[None, :] * a_sum[:, None])
    else:  # a tile across a group boundary: scale and zero per value, one word position at a time
        for w0 in range(w_start, w_end, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            words = tl.load(qweight_ptr + offs_w[:, None] * N + offs_n[None, :],
                            mask=(offs_w * PER_WORD < K)[:, None] & mask_n[None, :], other=0)
            for j in range(0, PER_WORD):
                k_j = offs_w * PER_WORD + j
                group = tl.load(g_idx_ptr + k_j, mask=k_j < K, other=0)
                zero_j = tl.load(qzeros_ptr + group[:, None] * zero_words + zword[None, :], mask=mask_n[None, :], other=0)
                zero_j = ((zero_j.to(tl.uint32, bitcast=True) >> zshift[None, :]) & mask_bits).to(tl.int32) + ZERO_OFFSET
                scale_j = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
                code_j = ((words.to(tl.uint32, bitcast=True).to(tl.int64) >> (j * BITS)) & mask_bits).to(tl.int32)
                w_j = scale_j.to(tl.float32) * (code_j - zero_j).to(tl.float32)
                a_j = tl.load(a_rows2 + k_j[None, :], mask=mask_m[:, None] & (k_j < K)[None, :], other=0.0)
                acc += tl.sum(a_j.to(tl.float32)[:, :, None] * w_j[None, :, :], axis=1)
    out = partial_ptr + split * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _reduce_kernel(partial_ptr, bias_ptr, out_ptr, M, N, SPLIT_K, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[M, N] = sum over splits of partial (+ bias), in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, SPLIT_K):
        acc += tl.load(partial_ptr + split * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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


def _operand_and_output(a: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The product's row operand with unit column stride (the kernels step columns by 1), and its
    empty [M, width] output in the operand's dtype."""
    if a.stride(1) != 1:
        a = a.contiguous()
    return a, torch.empty(a.shape[0], width, dtype=a.dtype, device=a.device)


def matmul_gptq_forward(a: torch.Tensor, weight: PackedGPTQ, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """a [M, K] @ W^T (+ bias) in a's dtype."""
    n, k = weight.shape
    if weight.perm is not None:
        a = a[:, weight.perm]  # held channel order
    a, out = _operand_and_output(a, n)
    m = a.shape[0]
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
    grad, out = _operand_and_output(grad, k)
    m = grad.shape[0]
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


GEMV_BLOCK_M = 8  # rows per GEMV program: 16 took 255 registers and spilled on sm_90; more rows, more programs
GEMV_BITS = (2, 4, 8)  # widths whose values never straddle a word (3 bits takes the fused kernel)
REDUCE_BLOCK = 1024


def gemv_config(m: int, n: int, k: int, bits: int, sms: int) -> dict:
    """Tiles and split of the GEMV: BLOCK_N = 512 columns (4 a thread over 4 warps, so that the
    values of `a` a thread converts serve 4 columns), BLOCK_W words so that a thread holds 32 K
    values (16 at 8 bits) x rows of the tile per column (sm_90, 4 bits: 122 registers at M = 1, 146 at M = 8, no
    spill), and SPLIT_K for ~2 programs per SM."""
    per_word = 32 // bits
    block_m = min(GEMV_BLOCK_M, triton.next_power_of_2(max(m, 1)))
    block_n = 512
    # 8 bits: 16 K values a column (32 spilled 8 B at M=2 on sm_86/89, where ptxas caps at 128 registers)
    block_w = max(1, (16 if bits == 8 else 32) // (per_word * block_m))
    words = triton.cdiv(k, per_word)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(words, block_w)))
    words_per_split = triton.cdiv(triton.cdiv(words, split_k), block_w) * block_w
    return dict(BLOCK_M=block_m, BLOCK_W=block_w, BLOCK_N=block_n, SPLIT_K=triton.cdiv(words, words_per_split),
                WORDS_PER_SPLIT=words_per_split)


MULTIPROCESSORS = {80: 108, 86: 72, 89: 58, 90: 132}  # A100, A10, L4, H100 SXM: the machine-code model's GPUs


def _multiprocessors(device: torch.device) -> int:
    """SMs of the GPU a launch runs on; without one (compile_only, the interpreter), the target arch's."""
    from qlora.kernels.launch import target_arch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return MULTIPROCESSORS.get(target_arch(device), 132)


def gemv_gptq(a: torch.Tensor, weight: PackedGPTQ, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """a [M, K] @ W^T (+ bias) in a's dtype, for small M and 2/4/8 bits (split-K GEMV + reduction)."""
    n, k = weight.shape
    if weight.bits not in GEMV_BITS:
        raise ValueError(f"gemv_gptq takes {list(GEMV_BITS)} bits, got {weight.bits}; 3 bits takes matmul_gptq_forward")
    if weight.perm is not None:
        a = a[:, weight.perm]
    if a.stride(1) != 1:
        a = a.contiguous()
    m = a.shape[0]
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    config = gemv_config(m, n, k, weight.bits, _multiprocessors(a.device))
    split_k = config.pop("SPLIT_K")
    words_per_split = config.pop("WORDS_PER_SPLIT")
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n, config["BLOCK_N"]), split_k, triton.cdiv(m, config["BLOCK_M"]))
    launch(_gemv_kernel, grid, a, weight.qweight, weight.qzeros, weight.scales, weight.g_idx, partial, m, k, n,
           weight.qzeros.shape[1], a.stride(0), words_per_split, BITS=weight.bits,
           ZERO_OFFSET=weight.zero_offset, **config, enable_fp_fusion=True)  # the products: sums of FMAs
    launch(_reduce_kernel, (triton.cdiv(m * n, REDUCE_BLOCK),), partial, bias if bias is not None else out, out, m, n,
           split_k, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, enable_fp_fusion=False)
    return out
