"""The frozen 4-bit linear as an autograd Function: Y = X W^T (+ b), dX = dY W, no dW.

Only the packed weight and its scales are saved for backward, never a dequantized copy: W is
dequantized again in backward, which costs one extra pass over ~0.5 byte/param but keeps the
activation memory of a QLoRA step free of dense weights.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from qlora.kernels import reference


class Linear4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, packed, absmax, code, nested_absmax, nested_code, offset, layout):
        blocksize, shape, nested_blocksize = layout
        scales = (absmax, code, nested_absmax, nested_code, offset)
        weight = _dequantize(packed, scales, layout, x.dtype)
        ctx.save_for_backward(packed, *scales)
        ctx.layout = layout
        ctx.bias_dtype = None if bias is None else bias.dtype
        return reference.linear_4bit(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        packed, *scales = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize(packed, scales, ctx.layout, grad_output.dtype)
            grad_x = reference.linear_4bit_grad_input(grad_output, weight)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None, None, None, None, None


def _dequantize(packed, scales, layout, dtype):
    absmax, code, nested_absmax, nested_code, offset = scales
    blocksize, shape, nested_blocksize = layout
    return reference.dequantize_4bit(
        packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset, nested_blocksize
    )


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    bias: Optional[torch.Tensor] = None,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """x [..., in] @ dequant(W [out, in]).T + bias, in x's dtype, differentiable in x and bias."""
    if x.shape[-1] != shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, the 4-bit weight {list(shape)} needs {shape[1]}")
    layout = (blocksize, tuple(shape), nested_blocksize)
    return Linear4bitFunction.apply(x, bias, packed, absmax, code, nested_absmax, nested_code, offset, layout)
