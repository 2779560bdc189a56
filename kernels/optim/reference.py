"""Pure-PyTorch twin of the fused 8-bit AdamW step: the CPU path and the oracle the Triton kernel
(adamw8bit.py) is tested against, bit for bit on the codes and absmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qlora.kernels.optim.checks import AdamW8bitHyper, AdamW8bitTensors


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values -> (uint8 index of the nearest code value, fp32 absmax per block).

    `code` is a sorted 256-value map on [-1, 1]; each value is scaled by its block's absmax and
    rounded to the nearest code (ties to the lower one). An all-zero block gets absmax 0 and the
    code of 0.
    """
    n = values.numel()
    padded = -(-n // blocksize) * blocksize
    blocks = F.pad(values.reshape(-1), (0, padded - n)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    midpoints = 0.5 * (code[:-1] + code[1:])
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 codes + fp32 absmax per block -> fp32 values."""
    n = codes.numel()
    padded = -(-n // blocksize) * blocksize
    values = code[F.pad(codes.reshape(-1), (0, padded - n)).long()].view(-1, blocksize) * absmax[:, None]
    return values.view(-1)[:n]


def adamw8bit_update_(tensors: AdamW8bitTensors, hyper: AdamW8bitHyper) -> None:
    """One AdamW step on a 1-D parameter whose moments are kept in 8 bits, all tensors updated in place.

    exp_avg (signed map) and exp_avg_sq (unsigned map) are uint8 codes with one fp32 absmax per
    `blocksize` elements. The moments are decoded, updated in fp32, used for the parameter update
    at full precision, and only then re-quantized with fresh per-block absmax (as bitsandbytes'
    blockwise 8-bit optimizers do). The parameter update is torch.optim.AdamW's formula.
    """
    param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_code, unsigned_code = tensors
    step, lr, beta1, beta2, eps, weight_decay, blocksize = hyper
    g = grad.reshape(-1).float()
    m = dequantize_blockwise_8bit(exp_avg, exp_avg_absmax, signed_code, blocksize)
    v = dequantize_blockwise_8bit(exp_avg_sq, exp_avg_sq_absmax, unsigned_code, blocksize)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p = param.reshape(-1).float()
    p.mul_(1 - lr * weight_decay)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)
    param.copy_(p.view_as(param))
    codes, absmax = quantize_blockwise_8bit(m, signed_code, blocksize)
    exp_avg.copy_(codes.view_as(exp_avg))
    exp_avg_absmax.copy_(absmax)
    codes, absmax = quantize_blockwise_8bit(v, unsigned_code, blocksize)
    exp_avg_sq.copy_(codes.view_as(exp_avg_sq))
    exp_avg_sq_absmax.copy_(absmax)


# ---- what the fused implementations (Triton, C) share with the twin ------------------------------
# Midpoint tables by code tensor. The entry keeps the code tensor alive, so its id is not reused
# while cached, and its version counter catches in-place edits of the code.
_MIDPOINTS: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
_MIDPOINTS_MAX = 16


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 decision midpoints of a sorted 256-entry code, padded with +inf to 256 entries."""
    cached = _MIDPOINTS.get(id(code))
    if cached is not None and cached[0] is code and cached[1] == code._version:
        return cached[2]
    # Exactly the reference's expression, so the fp32 midpoints are the same numbers.
    midpoints = 0.5 * (code[:-1] + code[1:])
    table = torch.cat((midpoints, midpoints.new_full((1,), math.inf))).contiguous()
    if len(_MIDPOINTS) >= _MIDPOINTS_MAX:
        _MIDPOINTS.clear()
    _MIDPOINTS[id(code)] = (code, code._version, table)
    return table


def step_scalars(hyper: AdamW8bitHyper) -> tuple[float, ...]:
    """(lerp weight, beta2, 1 - beta2, decay, step size, sqrt(bias correction 2), eps): the twin's Python
    scalars, computed in float64 as it computes them; each is rounded to fp32 when passed to a kernel,
    as torch rounds a Python scalar for an fp32 tensor op."""
    step, lr, beta1, beta2, eps, weight_decay, _ = hyper
    return (1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay, -lr / (1 - beta1 ** step),
            math.sqrt(1 - beta2 ** step), eps)


def lerp_from_end(lerp_weight: float) -> bool:
    """torch.lerp's switch, taken on the fp32 weight: |w| < 0.5 interpolates from the start, otherwise
    back from the end (a different formula, so a different rounding)."""
    return not abs(float(torch.tensor(lerp_weight, dtype=torch.float32))) < 0.5
