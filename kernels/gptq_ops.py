"""The GPTQ ops as torch.library custom ops (qlora::dequantize_gptq, qlora::matmul_gptq), the
autograd Function of the frozen GPTQ linear, and the dispatch to the Triton kernels or the twins.

As for the 4-bit ops (ops.py): register_fake shape functions let torch.compile trace a model that
calls them, and the backend choice (QLORA_BACKEND, device) runs inside the op at run time.
`dequantize(weight, dtype)` and `matmul(...)` are the one place a PackedGPTQ is flattened into
op arguments.

Triton paths: the fused kernels (gptq_triton.py) read the packed words inside the K loop, for the
forward X W^T and the backward dY W, so a step never materialises dense W; with an act-order
permutation x is gathered by perm first (and dX scattered back), which keeps each K tile inside
few groups. Rows above FUSED_MAX_M dequantize W once with the Triton kernel and call cuBLAS
(the same reasoning and the same starting threshold as the 4-bit ops).
"""
from __future__ import annotations

from typing import Optional

import torch

from qlora.kernels.backend import use_triton
from qlora.kernels.checks import check_compute_dtype
from qlora.kernels.gptq_format import OP_SCHEMA, PackedGPTQ, check_packed
from qlora.kernels.gptq_reference import dequantize_gptq_torch, matmul_gptq_torch

FUSED_MAX_M = 1024  # as ops.FUSED_MAX_M: a starting point, to be tuned on a GPU
_FIELDS = len(PackedGPTQ._fields)


def dequantize(weight: PackedGPTQ, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) [out, in] in `dtype` (original channel order), through qlora::dequantize_gptq."""
    return dequantize_gptq_op(*weight, dtype)


def matmul(a: torch.Tensor, weight: PackedGPTQ, bias: Optional[torch.Tensor], transpose_weight: bool) -> torch.Tensor:
    """a [M, in] @ W^T (+ bias) if transpose_weight, else a [M, out] @ W, through qlora::matmul_gptq."""
    return matmul_gptq_op(a, *weight, bias, transpose_weight)


@torch.library.custom_op("qlora::dequantize_gptq", mutates_args=(), schema=f"({OP_SCHEMA}, ScalarType dtype) -> Tensor")
def dequantize_gptq_op(*fields_and_dtype) -> torch.Tensor:
    *fields, dtype = fields_and_dtype
    weight = PackedGPTQ.from_op_args(fields)
    check_packed(weight)
    check_compute_dtype(dtype, "dequantize_gptq's output dtype")
    if use_triton(weight.device):
        from qlora.kernels.gptq_triton import dequantize_gptq_triton

        return dequantize_gptq_triton(weight, dtype)
    return dequantize_gptq_torch(weight, dtype)


@dequantize_gptq_op.register_fake
def _(*fields_and_dtype):
    *fields, dtype = fields_and_dtype
    weight = PackedGPTQ.from_op_args(fields)
    return weight.qweight.new_empty(weight.shape, dtype=dtype)


@torch.library.custom_op("qlora::matmul_gptq", mutates_args=(),
                         schema=f"(Tensor a, {OP_SCHEMA}, Tensor? bias, bool transpose_weight) -> Tensor")
def matmul_gptq_op(a: torch.Tensor, *fields_and_options) -> torch.Tensor:
    weight = PackedGPTQ.from_op_args(fields_and_options[:_FIELDS])
    bias, transpose_weight = fields_and_options[_FIELDS:]
    check_packed(weight)
    check_matmul_input(a, weight, transpose_weight, bias)
    if not use_triton(a.device):
        return matmul_gptq_torch(a, weight, bias, transpose_weight)
    from qlora.kernels import gptq_triton

    if a.shape[0] > FUSED_MAX_M or a.dtype == torch.float32 and a.device.type == "cuda":
        dense = gptq_triton.dequantize_gptq_triton(weight, a.dtype)
        return torch.nn.functional.linear(a, dense, bias) if transpose_weight else a @ dense
    if transpose_weight:
        return gptq_triton.matmul_gptq_forward(a, weight, bias)
    return gptq_triton.matmul_gptq_backward(a, weight)


@matmul_gptq_op.register_fake
def _(a, *fields_and_options):
    weight = PackedGPTQ.from_op_args(fields_and_options[:_FIELDS])
    transpose_weight = fields_and_options[_FIELDS + 1]
    return a.new_empty((a.shape[0], weight.shape[0] if transpose_weight else weight.shape[1]))


def check_matmul_input(a: torch.Tensor, weight: PackedGPTQ, transpose_weight: bool, bias: Optional[torch.Tensor]) -> None:
    n, k = weight.shape
    features = k if transpose_weight else n
    if a.dim() != 2 or a.shape[1] != features:
        raise ValueError(f"GPTQ matmul: input must be [M, {features}] for a [{n}, {k}] weight "
                         f"({'X W^T' if transpose_weight else 'dY W'}), got {list(a.shape)}")
    check_compute_dtype(a.dtype, "GPTQ matmul input dtype")
    if a.device != weight.device:
        raise ValueError(f"GPTQ matmul: input on {a.device}, weight on {weight.device}; move one of them")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"GPTQ matmul: bias must be [{n}], got {list(bias.shape)}")


class LinearGPTQFunction(torch.autograd.Function):
    """Y = X W^T (+ b), dX = dY W, no dW: only the packed tensors are saved for backward."""

    @staticmethod
    def forward(ctx, x, bias, weight: PackedGPTQ):
        rows = x.reshape(-1, x.shape[-1])
        y = matmul(rows, weight, None if bias is None else bias.to(x.dtype), True)
        tensors = [t for t in weight if isinstance(t, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.slots = tuple(i for i, t in enumerate(weight) if isinstance(t, torch.Tensor))
        ctx.fields = tuple(None if isinstance(t, torch.Tensor) else t for t in weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        fields = list(ctx.fields)
        for slot, tensor in zip(ctx.slots, ctx.saved_tensors):
            fields[slot] = tensor
        weight = PackedGPTQ(*fields)
        grad_x = grad_bias = None
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = matmul(rows, weight, None, False).view(*grad_output.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_bias = rows.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def linear_gptq(x: torch.Tensor, weight: PackedGPTQ, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., in] @ dequant(W).T + bias in x's dtype, differentiable in x and bias."""
    return LinearGPTQFunction.apply(x, bias, weight)
