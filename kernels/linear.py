"""The frozen 4-bit linear as an autograd Function: Y = X W^T (+ b), dX = dY W, no dW.

Only the packed weight and its scales are saved for backward, never a dequantized copy: W is
dequantized again in backward, which costs one extra pass over ~0.5 byte/param but keeps the
activation memory of a QLoRA step free of dense weights.

Both products go through the custom op qlora::matmul_4bit (ops.py), which runs the pure-PyTorch
reference or the Triton kernels as QLORA_BACKEND says (backend.py), and within Triton the GEMV,
fused or dequantize-then-cuBLAS path by the number of rows (ops.choose_path).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from qlora.kernels import ops


class Linear4bitFunction(torch.autograd.Function):
    """layout = (blocksize, (out, in), nested_blocksize[, path]); path as in ops.PATHS, default 'auto'."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, code, nested_absmax, nested_code, offset, layout):
        scales = (absmax, code, nested_absmax, nested_code, offset)
        y = _matmul(x, packed, scales, bias if bias is None else bias.to(x.dtype), layout, transpose_weight=True)
        ctx.save_for_backward(packed, *scales)
        ctx.layout = layout
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        packed, *scales = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad_output, packed, scales, None, ctx.layout, transpose_weight=False)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None, None, None, None, None


def _matmul(a, packed, scales, bias, layout, transpose_weight):
    """a [..., features] through qlora::matmul_4bit as 2-D rows; a 3-D input keeps its leading dims."""
    absmax, code, nested_absmax, nested_code, offset = scales
    blocksize, shape, nested_blocksize, *rest = layout
    path = rest[0] if rest else "auto"
    rows = a.reshape(-1, a.shape[-1])  # a view when it can be; 2-D strided inputs go in as they are
    out = ops.matmul_4bit_op(rows, packed, absmax, code, nested_absmax, nested_code, offset, bias, blocksize,
                             nested_blocksize, list(shape), transpose_weight, path)
    return out.view(*a.shape[:-1], out.shape[-1])


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
    path: str = "auto",
) -> torch.Tensor:
    """x [..., in] @ dequant(W [out, in]).T + bias, in x's dtype, differentiable in x and bias.

    `path` forces a Triton implementation ('gemv', 'fused', 'dequant_matmul'; for tests and
    benchmarks); 'auto' follows ops.choose_path.
    """
    if x.shape[-1] != shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, the 4-bit weight {list(shape)} needs {shape[1]}")
    if x.dim() == 0:
        raise ValueError("linear_4bit needs an input with a feature dimension, got a 0-d tensor")
    layout = (blocksize, tuple(shape), nested_blocksize, path)
    return Linear4bitFunction.apply(x, bias, packed, absmax, code, nested_absmax, nested_code, offset, layout)
