"""LLM.int8 (bitsandbytes' 8-bit format) in plain PyTorch: the quantizer, the dequantizer and the
forward with outlier decomposition. These are the CPU path and the oracle of the Triton kernels.

The roundings to reproduce (bitsandbytes 0.45+ "default" backend, the one its CPU build runs):
- quantize: SCB = max|A| per row in fp32; CB = round(A * ((1 / SCB) * 127)) to int8, the product taken
  in fp32 whatever A's dtype (a 16-bit tensor times an fp32 tensor promotes), round half to even.
  A row of zeros has SCB = 0 and CB = 0 (bitsandbytes computes 0 * inf = NaN and casts that to 0;
  here it is explicit, not left to an undefined NaN -> int8 cast).
- dequantize: (CB * SCB[:, None]) * fp32(1/127), in that order (bit for bit with bitsandbytes).
- forward: per-row int8 activations the same way, after zeroing the activations >= threshold in
  magnitude; the columns holding any such outlier are zeroed in CA and computed in the input dtype
  against dequant(CB) columns; the int8 product is exact in int32 (|sum| <= 127^2 K < 2^31 for
  K < 133,000) and scaled in fp32 by SCA * SCB / 127^2. bitsandbytes multiplies by 6.200124e-05,
  which is 1/127^2 = 6.2000124e-05 with a digit dropped (1.8e-5 relative); we use 1/127^2.
"""
from __future__ import annotations

from typing import Optional

import torch

INT8_MAX = 127.0
INV_127 = 1.0 / 127.0
INV_127_SQUARED = 1.0 / (127.0 * 127.0)


def int8_vectorwise_quant_torch(a: torch.Tensor, threshold: float = 0.0
                                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(CA int8 [rows, cols], SCA fp32 [rows], outlier column indices or None) of a 2-D float tensor.

    threshold > 0: elements with |a| >= threshold are left out of the row absmax, and whole columns
    holding one are zeroed in CA (their product is taken in 16-bit by the caller); the indices are
    int64, empty when no element reaches the threshold. threshold == 0: no decomposition (None)."""
    if a.dim() != 2:
        raise ValueError(f"int8_vectorwise_quant needs a 2-D tensor, got shape {list(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"int8_vectorwise_quant needs a float tensor, got {a.dtype}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 disables the outlier decomposition), got {threshold}")
    outlier_cols = None
    source = a
    if threshold > 0.0:
        outliers = a.abs() >= threshold
        outlier_cols = torch.nonzero(outliers.any(dim=0)).view(-1)
        if outlier_cols.numel():
            source = a.masked_fill(outliers, 0)
    row_absmax = source.abs().amax(dim=1).float()
    # bitsandbytes writes 127.0 / row_stats, which torch evaluates as reciprocal(row_stats) * 127:
    # two fp32 roundings, not one division. Spelled out here so the Triton kernel can copy it.
    scale = torch.reciprocal(row_absmax) * INT8_MAX  # inf on a zero row
    codes = torch.round(source * scale.unsqueeze(-1))
    codes = torch.where(row_absmax.unsqueeze(-1) == 0, 0.0, codes).to(torch.int8)
    if outlier_cols is not None and outlier_cols.numel():
        codes[:, outlier_cols] = 0
    return codes, row_absmax, outlier_cols


def int8_dequantize_torch(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W ~= CB * SCB / 127 [out, in] in `dtype` (computed in fp32, bit for bit with bitsandbytes)."""
    return (codes.float() * scb.float().view(-1, 1) * INV_127).to(dtype)


def outlier_product_torch(a: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor,
                          outlier_cols: torch.Tensor) -> torch.Tensor:
    """a[:, cols] @ dequant(CB)[:, cols]^T in a's dtype: one gather and one matmul for all columns."""
    sub_a = a.index_select(1, outlier_cols)
    sub_w = int8_dequantize_torch(codes.index_select(1, outlier_cols), scb, a.dtype)
    return sub_a @ sub_w.T


def int8_scaled_matmul_torch(ca: torch.Tensor, sca: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor,
                             bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """int32(CA @ CB^T) * SCA SCB / 127^2 (+ bias), the scaling in fp32, the result in `dtype`.

    The int8 products are summed exactly: in fp64 (53-bit mantissa > 31 bits of the int32 sum),
    since torch._int_mm is a slow scalar loop on CPUs without AVX-512 VNNI."""
    exact = (ca.double() @ codes.double().T).float()
    out = exact * (sca.float().view(-1, 1) * scb.float().view(1, -1)) * INV_127_SQUARED
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def int8_linear_torch(a: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                      threshold: float) -> torch.Tensor:
    """LLM.int8's forward: a [M, in] @ dequant(W)^T (+ bias) in a's dtype, the activations in int8 per
    row, the outlier columns (|a| >= threshold anywhere in the column; threshold 0: none) in a's dtype."""
    ca, sca, outlier_cols = int8_vectorwise_quant_torch(a, threshold)
    out = int8_scaled_matmul_torch(ca, sca, codes, scb, bias, a.dtype)
    if outlier_cols is not None and outlier_cols.numel():
        out = out + outlier_product_torch(a, codes, scb, outlier_cols)
    return out
