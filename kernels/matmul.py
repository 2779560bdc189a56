"""Triton: the fused 4-bit matmul, W tiles dequantized inside the K loop, fp32 accumulation in tl.dot.

One kernel serves both products of the frozen linear, C [M, cols] = A [M, R] @ B [R, cols]:
- forward  Y  = X  @ W^T: R = in,  cols = out, B[r, c] = W[c, r] at element c * in + r;
- backward dX = dY @ W:   R = out, cols = in,  B[r, c] = W[r, c] at element r * in + c.
Only the two element strides of B differ, so the kernel takes them as arguments. The weight never
exists dense in memory: the kernel reads ~0.53 byte/param (packed + scales) where dequantize-then-
cuBLAS writes and re-reads 2 bytes/param of bf16 on top, which is what wins when M is small and
the product is bound by reading W (M below a few hundred on an H100; see ops.FUSED_MAX_M).

The twin is reference.linear_4bit / linear_4bit_grad_input on reference.dequantize_4bit.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from qlora.kernels.checks import check_matmul_input, check_triton_size, check_weight
from qlora.kernels.dequantize import decode_4bit, weight_pointers
from qlora.kernels.launch import launch


@triton.jit
def _matmul_4bit_kernel(
    a_ptr, out_ptr, bias_ptr,
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    M, COLS, R,
    stride_am, stride_ar, stride_om, stride_oc, w_stride_r, w_stride_c,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles share each W column tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(COLS, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < COLS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        index = offs_r[:, None] * w_stride_r + offs_n[None, :] * w_stride_c
        w = decode_4bit(packed_ptr, index, mask_r[:, None] & mask_n[None, :], absmax_ptr, code_ptr,
                        nested_absmax_ptr, nested_code_ptr, offset_ptr, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        # W rounded to the input dtype once, as the dequantize-then-matmul path does; fp32 accumulate.
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def weight_strides(shape: Sequence[int], transpose_weight: bool) -> tuple[int, int, int, int]:
    """(R, cols, element stride along R, element stride along cols) of B = W^T or W."""
    out_features, in_features = shape
    if transpose_weight:
        return in_features, out_features, 1, in_features
    return out_features, in_features, in_features, 1


def input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products unless torch itself allows TF32 (torch's default: it does not),
    # so the fused path matches torch.matmul's numerics. fp16/bf16 keep Triton's default ("tf32",
    # meaningless for 16-bit operands): "ieee" there could keep the compiler off the tensor cores.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def matmul_block_sizes(m: int, dtype: torch.dtype) -> tuple[int, int, int]:
    # tl.dot needs BLOCK_M >= 16; decode-sized M pads to 16 rows rather than wasting 64.
    # 16-bit: 64x64x64 tiles keep a 4096x4096 product at 4096 programs for M=4096; on sm_90 they
    # compile to 150 registers, no spills (tests/test_kernels_compiled.py). fp32 products run on
    # the CUDA cores (FMA, unrolled per thread): 64x64x64 spills there, 32x32x32 fits in registers.
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if dtype == torch.float32:
        return min(block_m, 32), 32, 32
    return block_m, 64, 64


def matmul_4bit_fused(
    a: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    transpose_weight: bool,
    bias: Optional[torch.Tensor] = None,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """a [M, R] (any strides) @ (W^T if transpose_weight else W) (+ bias) -> [M, cols] in a's dtype."""
    check_weight(packed, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize)
    check_matmul_input(a, packed, shape, transpose_weight, bias)
    check_triton_size(shape)
    r, cols, w_stride_r, w_stride_c = weight_strides(shape, transpose_weight)
    m = a.shape[0]
    out = _output(out, (m, cols), a)
    packed, absmax, nested_absmax, nested_code, offset, double_quant = weight_pointers(
        packed, absmax, nested_absmax, nested_code, offset)
    block_m, block_n, block_r = matmul_block_sizes(m, a.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(cols, block_n),)
    launch(
        _matmul_4bit_kernel, grid,
        a, out, bias if bias is not None else out,
        packed, absmax, code.contiguous(), nested_absmax, nested_code, offset,
        m, cols, r, a.stride(0), a.stride(1), out.stride(0), out.stride(1), w_stride_r, w_stride_c,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, GROUP_M=8, INPUT_PRECISION=input_precision(a.dtype),
        enable_fp_fusion=True,  # explicit: Triton 3.10 flips the default; FMAs are what a GEMM wants
    )
    return out


def _output(out: Optional[torch.Tensor], shape: tuple[int, int], a: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=a.dtype, device=a.device)
    if tuple(out.shape) != shape or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"out must be a {list(shape)} {a.dtype} tensor on {a.device}, "
                         f"got {list(out.shape)} {out.dtype} on {out.device}")
    return out
