"""The frozen 4-bit linear as an autograd Function: Y = X W^T (+ b), dX = dY W, no dW.

Only the packed weight and its scales are saved for backward, never a dequantized copy: W is
dequantized again in backward, which costs one extra pass over ~0.5 byte/param but keeps the
activation memory of a QLoRA step free of dense weights.

Both products go through the custom op qlora::matmul_4bit (ops.py), which runs the pure-PyTorch
reference or the Triton kernels as QLORA_BACKEND says (backend.py), and within Triton the GEMV,
fused or dequantize-then-cuBLAS path by the number of rows (ops.choose_path).
"""
from __future__ import annotations

from typing import Optional

import torch

from qlora.kernels.nf4 import ops
from qlora.kernels.nf4.packed import Packed4bit
from qlora.kernels.packed_args import save_weight, saved_weight


class Linear4bitFunction(torch.autograd.Function):
    """Y = X W^T (+ b) with W a Packed4bit; `path` as in ops.PATHS ('auto' follows ops.choose_path)."""

    @staticmethod
    def forward(ctx, x, bias, weight: Packed4bit, path: str = "auto"):
        y = _matmul(x, weight, None if bias is None else bias.to(x.dtype), path, transpose_weight=True)
        save_weight(ctx, weight)  # the packed bytes, never a dense copy of W
        ctx.path = path
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        weight = saved_weight(ctx, Packed4bit)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad_output, weight, None, ctx.path, transpose_weight=False)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


def _matmul(a, weight: Packed4bit, bias, path, transpose_weight):
    """a [..., features] through qlora::matmul_4bit as 2-D rows; a 3-D input keeps its leading dims."""
    rows = a.reshape(-1, a.shape[-1])  # a view when it can be; 2-D strided inputs go in as they are
    out = ops.matmul(rows, weight, bias, transpose_weight, path)
    return out.view(*a.shape[:-1], out.shape[-1])


def linear_4bit(x: torch.Tensor, weight: Packed4bit, bias: Optional[torch.Tensor] = None, path: str = "auto") -> torch.Tensor:
    """x [..., in] @ dequant(W [out, in]).T + bias, in x's dtype, differentiable in x and bias.

    `path` forces a Triton implementation ('gemv', 'fused', 'dequant_matmul'; for tests and
    benchmarks); 'auto' follows ops.choose_path.
    """
    if x.dim() == 0:
        raise ValueError("linear_4bit needs an input with a feature dimension, got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, the 4-bit weight "
                         f"{list(weight.shape)} needs {weight.shape[1]}")
    return Linear4bitFunction.apply(x, bias, weight, path)
