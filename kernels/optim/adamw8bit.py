"""Triton: one fused AdamW step on a parameter whose two moments are kept as blockwise 8-bit codes.

The twin is `reference.adamw8bit_update_`. One program owns one quantization block: it decodes
both moments, updates them and the parameter in fp32, and re-quantizes the moments with the
block's fresh absmax, so the moments never exist in fp32 in memory (~6 bytes of state traffic per
element instead of ~16 for decode, update and re-quantize as separate passes).

The new codes must equal the reference's bit for bit, since they feed every later step. So the
kernel repeats the reference's roundings exactly, on CPU and on CUDA alike:
- the decode code * absmax is a product of its own (launched with enable_fp_fusion=False: a
  compiler would otherwise fuse it into the subtraction that follows);
- torch computes lerp and addcmul with one fused multiply-add each (a + b * c as written in its
  kernels, fused by the compiler on CUDA and by the vector code on CPU, measured), so those two
  are explicit tl.fma;
- the divisions and the square root are IEEE (div_rn, sqrt_rn): Triton's plain `/` and sqrt
  may lower to approximate instructions on GPU;
- the nearest code is torch.bucketize's answer: the number of code midpoints strictly below the
  scaled value, found by an 8-step binary search over the midpoints (computed on the host with
  the reference's own expression) padded with +inf to 256 entries.
The parameter is computed with the same operations; on CUDA torch divides by the scalar
sqrt(bias correction 2) as a multiply by its reciprocal, so there the parameter may differ from
the reference by an fp32 ulp (the moments do not depend on it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora.kernels.launch import launch
from qlora.kernels.optim.checks import AdamW8bitHyper, AdamW8bitTensors, check_adamw8bit_args
from qlora.kernels.optim.reference import code_midpoints, lerp_from_end, step_scalars


@triton.jit
def _nearest_code(x, midpoints_ptr):
    """Index of the nearest code: the count of midpoints < x (torch.bucketize, right=False)."""
    index = tl.zeros(x.shape, dtype=tl.int32)
    # Branchless lower bound over 256 sorted entries; entry 255 is +inf, so the answer is <= 255.
    for shift in tl.static_range(7, -1, -1):
        probe = tl.load(midpoints_ptr + index + ((1 << shift) - 1))
        index = tl.where(probe < x, index + (1 << shift), index)
    # NaN compares false with every midpoint, so the search ends at 0; torch.bucketize sorts NaN
    # past every boundary and returns 255. A NaN moment must keep decoding as the reference's.
    return tl.where(x != x, 255, index)


@triton.jit
def _absmax(x):
    """max |x| over the block, NaN if any element is NaN (as torch's amax; tl.max drops NaN)."""
    has_nan = tl.max((x != x).to(tl.int32), axis=0)
    return tl.where(has_nan > 0, float("nan"), tl.max(tl.abs(x), axis=0))


@triton.jit
def _adamw8bit_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_absmax_ptr, exp_avg_sq_ptr, exp_avg_sq_absmax_ptr,
    signed_code_ptr, unsigned_code_ptr, signed_midpoints_ptr, unsigned_midpoints_ptr, numel,
    lerp_weight, beta2, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps,
    BLOCKSIZE: tl.constexpr, LERP_FROM_END: tl.constexpr,
):
    block = tl.program_id(0)
    # int64 offsets: a parameter may have more than 2**31 elements.
    offsets = block.to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    mask = offsets < numel

    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m_codes = tl.load(exp_avg_ptr + offsets, mask=mask, other=0).to(tl.int32)
    v_codes = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0).to(tl.int32)
    m = tl.load(signed_code_ptr + m_codes) * tl.load(exp_avg_absmax_ptr + block)
    v = tl.load(unsigned_code_ptr + v_codes) * tl.load(exp_avg_sq_absmax_ptr + block)

    # m.lerp_(g, w): torch's two formulas (small weight from m, large weight from g), one FMA each.
    if LERP_FROM_END:
        m = tl.fma(lerp_weight - 1.0, g - m, g)
    else:
        m = tl.fma(lerp_weight, g - m, m)
    # v.mul_(beta2).addcmul_(g, g, value=1 - beta2): a separate product, then (c * g) * g + v fused.
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    # Padding lanes decoded code[0] * absmax: zero them so they cannot raise the block's absmax
    # (nor overflow the masked parameter store).
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)

    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    p = p * decay
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(step_size * m, denom)
    tl.store(param_ptr + offsets, p.to(param_ptr.dtype.element_ty), mask=mask)

    m_absmax = _absmax(m)
    v_absmax = _absmax(v)
    # An all-zero block keeps absmax 0 and is scaled by 1, so it gets the code of 0; so does a
    # NaN block (NaN > 0 is false), exactly as the reference's torch.where.
    m_index = _nearest_code(tl.div_rn(m, tl.where(m_absmax > 0, m_absmax, 1.0)), signed_midpoints_ptr)
    v_index = _nearest_code(tl.div_rn(v, tl.where(v_absmax > 0, v_absmax, 1.0)), unsigned_midpoints_ptr)
    tl.store(exp_avg_ptr + offsets, m_index.to(tl.uint8), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v_index.to(tl.uint8), mask=mask)
    tl.store(exp_avg_absmax_ptr + block, m_absmax)
    tl.store(exp_avg_sq_absmax_ptr + block, v_absmax)


def adamw8bit_update_triton(tensors: AdamW8bitTensors, hyper: AdamW8bitHyper) -> None:
    """Triton twin of reference.adamw8bit_update_: param, both moments and their absmax in place."""
    check_adamw8bit_args(tensors, hyper)
    param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_code, unsigned_code = tensors
    blocksize = hyper.blocksize
    numel = param.numel()
    if numel == 0:
        return
    lerp_weight, beta2, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps = step_scalars(hyper)
    launch(
        _adamw8bit_kernel, (triton.cdiv(numel, blocksize),),
        param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_code, unsigned_code,
        code_midpoints(signed_code), code_midpoints(unsigned_code), numel,
        lerp_weight, beta2, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps,
        BLOCKSIZE=blocksize, LERP_FROM_END=lerp_from_end(lerp_weight),
        # 256 elements on 2 warps: 4 per thread. To be tuned on H100.
        num_warps=2 if blocksize <= 256 else 4,
        enable_fp_fusion=False,
    )
