"""Triton: LLM.int8's forward. Per-row int8 activations, an int8 x int8 -> int32 tl.dot with the
scales, the bias and the outlier product fused into its epilogue.

    Y = int32(CA @ CB^T) * SCA SCB / 127^2 + bias + A[:, outliers] @ dequant(CB[:, outliers])^T

Three steps, all batched (no per-column Python loop):
1. outlier columns: one torch reduction `(|A| >= threshold).any(0)` and `nonzero` (the only host
   sync; bitsandbytes has the same one), then one `index_select` each for the few columns of A
   (in A's dtype) and of CB (int8) they name;
2. `_int8_quantize_rows_kernel`: one program per row; absmax over the non-outlier elements, then
   CA = round-half-even(A * 127 / SCA) with the outlier columns zeroed (bitsandbytes' rules);
3. `_int8_matmul_kernel`: the int32 K loop on the tensor cores (int8 MMA: 2x the bf16 rate on
   A100/H100), then a second short loop over the outlier columns in A's dtype with W columns
   dequantized in registers, and the epilogue in fp32: one rounding to the output dtype.

The twin is int8_reference.int8_linear_torch. Differences, both below one output ulp: the twin adds
the outlier product after rounding the int8 part to the output dtype (as bitsandbytes does), here
it is added in fp32 first; fp32 rounding order inside the sums.
Rounding in step 2 is (x + 1.5 * 2^23) - 1.5 * 2^23: exact round-half-to-even for |x| <= 127 in fp32
(torch.round's rule), with no libdevice call, so the interpreter runs the same code.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qlora.kernels.int8.reference import INV_127, INV_127_SQUARED
from qlora.kernels.launch import launch

ROUND_MAGIC = 12582912.0  # 1.5 * 2^23


@triton.jit
def _int8_quantize_rows_kernel(a_ptr, outlier_ptr, codes_ptr, sca_ptr, K, stride_am, stride_ak, THRESHOLD,
                               HAS_THRESHOLD: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.abs(tl.load(a_ptr + row * stride_am + offs * stride_ak, mask=offs < K, other=0.0).to(tl.float32))
        if HAS_THRESHOLD:
            x = tl.where(x >= THRESHOLD, 0.0, x)  # outlier elements do not set the row's scale
        absmax = tl.maximum(absmax, x)
    sca = tl.max(absmax, axis=0)
    tl.store(sca_ptr + row, sca)
    # (1 / SCA) * 127 with an IEEE reciprocal, as torch evaluates bitsandbytes' 127.0 / SCA; inf on a
    # zero row, whose codes are set to 0 below.
    scale = tl.math.div_rn(1.0, sca) * 127.0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(a_ptr + row * stride_am + offs * stride_ak, mask=offs < K, other=0.0).to(tl.float32)
        q = (x * scale + ROUND) - ROUND
        if HAS_THRESHOLD:
            q = tl.where(tl.load(outlier_ptr + offs, mask=offs < K, other=0) != 0, 0.0, q)
        q = tl.where(sca == 0.0, 0.0, q)
        tl.store(codes_ptr + row * K + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def _int8_matmul_kernel(
    ca_ptr, cb_ptr, sca_ptr, scb_ptr, bias_ptr, sub_a_ptr, sub_w_ptr, out_ptr,
    M, N, K, OUTLIERS, stride_om,
    HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, INV_SCALE: tl.constexpr, INV_SCALE_SQUARED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles share each CB column tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows_m, rows_n = offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(ca_ptr + rows_m * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(cb_ptr + rows_n * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # exact: |sum| <= 127^2 K < 2^31 for K < 133,000

    sca = tl.load(sca_ptr + offs_m, mask=mask_m, other=0.0)
    scb = tl.load(scb_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * (sca[:, None] * scb[None, :]) * INV_SCALE_SQUARED
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_OUTLIERS:  # accumulated into the fp32 result itself: no third BLOCK_M x BLOCK_N accumulator
        for o0 in range(0, OUTLIERS, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            mask_o = offs_o < OUTLIERS
            sub_a = tl.load(sub_a_ptr + rows_m * OUTLIERS + offs_o[None, :], mask=mask_m[:, None] & mask_o[None, :],
                            other=0.0)
            codes = tl.load(sub_w_ptr + rows_n * OUTLIERS + offs_o[:, None], mask=mask_o[:, None] & mask_n[None, :],
                            other=0)
            # dequant(CB) columns as the twin rounds them: (CB * SCB) / 127 in fp32, then A's dtype.
            w = ((codes.to(tl.float32) * scb[None, :]) * INV_SCALE).to(sub_a.dtype)
            out = tl.dot(sub_a, w, out, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + rows_m * stride_om + rows_n, out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def matmul_block_sizes(m: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). int8 MMA takes k = 32 per instruction; tl.dot needs
    M >= 16, so decode rows pad to 16. A 64x128 tile holds its int32 accumulator, then the fp32
    result, in 64 registers per thread with 4 warps: with the operand tiles that spilled 208
    bytes/thread on sm_80, so the large tile runs 8 warps (32 registers each for the accumulator). In
    fp32 the outlier tl.dot runs on the CUDA cores, unrolled per thread: 32x128 spilled 96 bytes with
    4 warps, so fp32 takes 8 warps from M > 16 on."""
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 32:
        return 32, 128, 128, 8 if dtype == torch.float32 else 4
    return 64, 128, 128, 8


def quantize_rows_triton(a: torch.Tensor, threshold: float, outlier_mask: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CA int8 [M, K], SCA fp32 [M]) of a 2-D float tensor, outlier columns (mask, int8) zeroed."""
    m, k = a.shape
    codes = torch.empty((m, k), dtype=torch.int8, device=a.device)
    sca = torch.empty(m, dtype=torch.float32, device=a.device)
    has_threshold = outlier_mask is not None
    launch(_int8_quantize_rows_kernel, (m,), a, outlier_mask if has_threshold else codes, codes, sca, k,
           a.stride(0), a.stride(1), float(threshold), HAS_THRESHOLD=has_threshold,
           BLOCK_K=min(1024, triton.next_power_of_2(max(k, 16))), ROUND=ROUND_MAGIC, enable_fp_fusion=False)
    return codes, sca


def int8_linear_triton(a: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                       threshold: float) -> torch.Tensor:
    """Triton twin of int8_reference.int8_linear_torch: a [M, in] -> [M, out] in a's dtype."""
    m, k = a.shape
    n = codes.shape[0]
    codes, scb = codes.contiguous(), scb.contiguous()
    outlier_mask = outlier_cols = None
    if threshold > 0:
        columns = (a.abs() >= threshold).any(dim=0)
        outlier_mask = columns.to(torch.int8)
        outlier_cols = torch.nonzero(columns).view(-1)
    ca, sca = quantize_rows_triton(a, threshold, outlier_mask)
    has_outliers = outlier_cols is not None and outlier_cols.numel() > 0
    if has_outliers:
        sub_a = a.index_select(1, outlier_cols).contiguous()
        sub_w = codes.index_select(1, outlier_cols).contiguous()
    else:
        sub_a, sub_w = a, codes  # not read: HAS_OUTLIERS is off
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    block_m, block_n, block_k, num_warps = matmul_block_sizes(m, a.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    launch(
        _int8_matmul_kernel, grid,
        ca, codes, sca, scb, bias if bias is not None else out, sub_a, sub_w, out,
        m, n, k, outlier_cols.numel() if has_outliers else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_OUTLIERS=has_outliers, INV_SCALE=INV_127, INV_SCALE_SQUARED=INV_127_SQUARED,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_O=16, GROUP_M=8,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
        num_warps=num_warps, enable_fp_fusion=False,  # the epilogue rounds as the twin does: no FMA contraction
    )
    return out
