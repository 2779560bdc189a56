"""The arguments of the fused 8-bit AdamW step, as two named tuples every implementation takes (the
public op in ops.py, the twin in reference.py, the Triton kernel in adamw8bit.py), and the input
checks they share, so code that runs on CPU with the twin runs on GPU unchanged.

The checks read only shapes, dtypes, devices and strides, never values: no device sync.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class AdamW8bitTensors(NamedTuple):
    """The tensors one step reads and updates in place, each 1-D and contiguous. exp_avg (signed map)
    and exp_avg_sq (unsigned map) are uint8 codes with one fp32 absmax per `blocksize` elements;
    the codes are the two 256-value sorted fp32 maps."""
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_absmax: torch.Tensor
    exp_avg_sq: torch.Tensor
    exp_avg_sq_absmax: torch.Tensor
    signed_code: torch.Tensor
    unsigned_code: torch.Tensor


class AdamW8bitHyper(NamedTuple):
    """The step's scalars: `step` is the 1-based count of steps taken including this one."""
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    blocksize: int = 256


PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_adamw8bit_args(tensors: AdamW8bitTensors, hyper: AdamW8bitHyper) -> None:
    """Every tensor 1-D, contiguous, on param's device, with the dtype and length the step needs."""
    param, grad, step, blocksize = tensors.param, tensors.grad, hyper.step, hyper.blocksize
    if not isinstance(blocksize, int) or not 32 <= blocksize <= 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be the 1-based count of optimizer steps taken including this one, got {step!r}")
    tensors = tensors._asdict()
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
