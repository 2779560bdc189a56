"""The fused 8-bit AdamW step: the dispatch between the Triton kernel and the reference, and the
input checks both share (so code that runs on CPU with the reference runs on GPU unchanged).

The checks read only shapes, dtypes, devices and strides, never values: no device sync.
"""
from __future__ import annotations

import torch

from qlora.kernels import reference, selfcheck
from qlora.kernels.backend import use_triton

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_adamw8bit_args(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    signed_code: torch.Tensor,
    unsigned_code: torch.Tensor,
    *,
    step: int,
    blocksize: int,
) -> None:
    """Every tensor 1-D, contiguous, on param's device, with the dtype and length the step needs."""
    if not isinstance(blocksize, int) or not 32 <= blocksize <= 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be the 1-based count of optimizer steps taken including this one, got {step!r}")
    tensors = {
        "param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_absmax": exp_avg_absmax,
        "exp_avg_sq": exp_avg_sq, "exp_avg_sq_absmax": exp_avg_sq_absmax,
        "signed_code": signed_code, "unsigned_code": unsigned_code,
    }
    for name, tensor in tensors.items():
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(tensor.shape)}; "
                             f"pass {name}.view(-1) of a contiguous tensor")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the step reads and writes it flat); "
                             "keep the optimizer state and the parameter contiguous")
        if tensor.device != param.device:
            raise ValueError(f"{name} is on {tensor.device} but param is on {param.device}; keep the optimizer state "
                             "on the parameter's device")
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"param must be float32, float16 or bfloat16, got {param.dtype}; "
                        "keep trainable parameters in one of those dtypes")
    if grad.dtype not in PARAM_DTYPES:
        raise TypeError(f"grad must be float32, float16 or bfloat16, got {grad.dtype}; cast it with .to(param.dtype)")
    n = param.numel()
    if grad.numel() != n:
        raise ValueError(f"grad has {grad.numel()} elements but param has {n}")
    blocks = -(-n // blocksize)
    for name in ("exp_avg", "exp_avg_sq"):
        if tensors[name].dtype != torch.uint8:
            raise TypeError(f"{name} holds 8-bit codes and must be uint8, got {tensors[name].dtype}")
        if tensors[name].numel() != n:
            raise ValueError(f"{name} has {tensors[name].numel()} codes but param has {n} elements; "
                             "the state needs one code per element")
        absmax = tensors[name + "_absmax"]
        if absmax.dtype != torch.float32:
            raise TypeError(f"{name}_absmax must be float32, got {absmax.dtype}; "
                            "allocate it with dtype=torch.float32")
        if absmax.numel() != blocks:
            raise ValueError(f"{name}_absmax has {absmax.numel()} entries, {n} elements in blocks of {blocksize} "
                             f"need {blocks}")
    for name in ("signed_code", "unsigned_code"):
        code = tensors[name]
        if code.dtype != torch.float32 or code.numel() != 256:
            raise ValueError(f"{name} must be the 256 sorted fp32 code values, got {code.numel()} of {code.dtype}")


def adamw8bit_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    signed_code: torch.Tensor,
    unsigned_code: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    blocksize: int = 256,
) -> None:
    """One AdamW step with 8-bit moments, in place (see reference.adamw8bit_update_ for the math).

    Runs the fused Triton kernel when the backend picks Triton for param's device, the reference
    otherwise. Either way it runs outside autograd, as an optimizer step does: the kernel writes
    through raw pointers, which autograd could not record anyway.
    """
    tensors = (param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_code, unsigned_code)
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, blocksize=blocksize)
    with torch.no_grad():
        if use_triton(param.device) and selfcheck.passed("adamw8bit", param.device, grad.dtype):
            # Imported here: the CPU path must never import triton.
            from qlora.kernels.adamw8bit import adamw8bit_update_triton

            adamw8bit_update_triton(*tensors, **hyper)
            return
        check_adamw8bit_args(*tensors, step=step, blocksize=blocksize)
        reference.adamw8bit_update_(*tensors, **hyper)
