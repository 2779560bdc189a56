"""The LLM.int8 ops as torch.library custom ops (qlora::int8_dequantize, qlora::int8_linear): one
dispatch point per operation, like the 4-bit ops in ops.py, so that every caller (the layer, LoRA's
DoRA, the export merge) reaches the Triton kernel on a GPU, the CPU kernels (cpu.py) on a CPU with
a C compiler and the PyTorch twin elsewhere (QLORA_BACKEND=torch: everywhere), and
torch.compile traces them through their fake implementations.

qlora::int8_linear carries its own autograd formula (torch.library.register_autograd): with a
frozen weight dX = dY dequant(W), computed from the int8 codes at backward time (nothing dense is
kept between forward and backward), and d(bias) = sum of dY over the rows.
"""
from __future__ import annotations

from typing import Optional

import torch

from qlora.kernels.int8 import reference as reference
from qlora.kernels import selfcheck
from qlora.kernels.backend import use_cpu_kernels, use_triton
from qlora.kernels.int8 import cpu as cpu_kernels
from qlora.kernels.int8 import selfcheck as _checks  # noqa: F401  (registers the int8 paths' self-checks)
from qlora.kernels.dtypes import FLOAT_DTYPES


def check_int8_weight(codes: torch.Tensor, scb: torch.Tensor) -> None:
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"an LLM.int8 weight is a 2-D int8 tensor [out, in], got {codes.dtype} {list(codes.shape)}")
    if scb.dtype != torch.float32 or tuple(scb.shape) != (codes.shape[0],):
        raise ValueError(f"SCB must be fp32 of shape [{codes.shape[0]}] (one absmax per output row), got "
                         f"{scb.dtype} {list(scb.shape)}")


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")


# ---- qlora::int8_dequantize ----------------------------------------------------------------------
@torch.library.custom_op("qlora::int8_dequantize", mutates_args=())
def int8_dequantize(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) = CB * SCB / 127, [out, in] in `dtype`."""
    check_int8_weight(codes, scb)
    _check_dtype(dtype, "int8_dequantize's output dtype")
    if use_triton(codes.device) and selfcheck.passed("int8_dequantize", codes.device, dtype):
        from qlora.kernels.int8.dequantize import int8_dequantize_triton

        return int8_dequantize_triton(codes, scb, dtype)
    if _cpu_path(codes.device, dtype):
        return cpu_kernels.int8_dequantize_cpu(codes, scb, dtype)
    return reference.int8_dequantize_torch(codes, scb, dtype)


def _cpu_path(device: torch.device, dtype: torch.dtype) -> bool:
    return use_cpu_kernels(device, cpu_kernels.available) and selfcheck.passed("cpu_int8_dequantize", device, dtype)


@int8_dequantize.register_fake
def _(codes, scb, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


# ---- qlora::int8_linear --------------------------------------------------------------------------
@torch.library.custom_op("qlora::int8_linear", mutates_args=())
def int8_linear(a: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                threshold: float) -> torch.Tensor:
    """LLM.int8: a [M, in] @ dequant(W)^T (+ bias) in a's dtype, with outlier decomposition at
    `threshold` (0 disables it)."""
    check_int8_weight(codes, scb)
    _check_dtype(a.dtype, "the input dtype")
    if a.dim() != 2 or a.shape[1] != codes.shape[1]:
        raise ValueError(f"int8_linear: input of shape {list(a.shape)} does not fit a weight of shape "
                         f"{list(codes.shape)} (needs [M, {codes.shape[1]}])")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 disables the outlier decomposition), got {threshold}")
    if a.shape[0] == 0:
        return a.new_empty((0, codes.shape[0]))
    if use_triton(a.device) and selfcheck.passed("int8_matmul", a.device, a.dtype):
        from qlora.kernels.int8.matmul import int8_linear_triton

        return int8_linear_triton(a, codes, scb, bias, threshold)
    if _cpu_path(a.device, a.dtype):
        return cpu_kernels.int8_linear_cpu(a, codes, scb, bias, threshold)
    return reference.int8_linear_torch(a, codes, scb, bias, threshold)


@int8_linear.register_fake
def _(a, codes, scb, bias, threshold):
    return a.new_empty((a.shape[0], codes.shape[0]))


def _setup_context(ctx, inputs, output):
    a, codes, scb, bias, _ = inputs
    ctx.save_for_backward(codes, scb)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_output):
    codes, scb = ctx.saved_tensors
    grad_a = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_a = grad_output @ int8_dequantize(codes, scb, grad_output.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad_output.sum(0).to(ctx.bias_dtype)
    return grad_a, None, None, grad_bias, None


int8_linear.register_autograd(_backward, setup_context=_setup_context)


def linear_int8(x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor] = None,
                threshold: float = 6.0) -> torch.Tensor:
    """x [..., in] @ dequant(W)^T (+ bias), differentiable in x and bias; any leading dimensions."""
    out = int8_linear(x.reshape(-1, x.shape[-1]), codes, scb, bias, float(threshold))
    return out.reshape(*x.shape[:-1], codes.shape[0])
