"""The fast CPU path of the LLM.int8 ops: the decode in C (cpu.c), the int8 product by torch._int_mm
where the CPU has int8 dot-product instructions (AVX-512 VNNI / AMX), else the twin's fp64 product.

The decode is the twin's bytes in one pass. The forward's int8 product is exact in int32 on both
paths (|sum| <= 127^2 K < 2^31), so _int_mm and the twin's fp64 matmul give the same integers; the
scaling and the outlier columns are the twin's own functions.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

from qlora.kernels import native
from qlora.kernels.int8 import reference

SOURCE = Path(__file__).with_name("cpu.c")
SIGNATURES = {"qlora_int8_dequantize": (native.PTR, native.PTR, native.I64, native.I64, native.I64, native.PTR,
                                        native.INT)}
MIN_ROWS_PER_THREAD = 64


def available() -> bool:
    return native.library(SOURCE, SIGNATURES) is not None


def int8_dequantize_cpu(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) = CB * SCB / 127 [out, in] in `dtype`: the twin's bytes."""
    lib = native.library(SOURCE, SIGNATURES)
    codes, scb = codes.contiguous(), scb.float().contiguous()
    rows, cols = codes.shape
    out = native.empty_output((rows, cols), dtype)

    def decode(first: int, last: int) -> None:
        lib.qlora_int8_dequantize(codes.data_ptr(), scb.data_ptr(), cols, first, last, out.data_ptr(),
                                  native.DTYPE_KIND[dtype])

    native.parallel_ranges(decode, rows, MIN_ROWS_PER_THREAD)
    return out


@functools.cache
def int_mm_is_vectorized() -> bool:
    """torch._int_mm is a fast kernel only with int8 dot-product instructions; elsewhere a scalar loop."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX512", "AVX512_BF16", "AMX") and _has_vnni()


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " amx_int8" in flags


def int8_scaled_matmul_cpu(ca: torch.Tensor, sca: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor,
                           bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """reference.int8_scaled_matmul_torch with the exact int32 product from torch._int_mm."""
    if not int_mm_is_vectorized() or ca.shape[0] <= 16:  # _int_mm wants M > 16
        return reference.int8_scaled_matmul_torch(ca, sca, codes, scb, bias, dtype)
    exact = torch._int_mm(ca, codes.t()).float()
    out = exact * (sca.float().view(-1, 1) * scb.float().view(1, -1)) * reference.INV_127_SQUARED
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def int8_linear_cpu(a: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                    threshold: float) -> torch.Tensor:
    """reference.int8_linear_torch with the int8 product above and the C decode for the outliers."""
    ca, sca, outlier_cols = reference.int8_vectorwise_quant_torch(a, threshold)
    out = int8_scaled_matmul_cpu(ca, sca, codes, scb, bias, a.dtype)
    if outlier_cols is not None and outlier_cols.numel():
        out = out + reference.outlier_product_torch(a, codes, scb, outlier_cols)
    return out
