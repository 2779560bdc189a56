"""Pure-PyTorch twins of the 4-bit kernels: the CPU path and the test oracle.

Every function here reproduces bitsandbytes' arithmetic exactly (fp32 products, one cast at the
end), so that the Triton kernels can be checked bit for bit against it in fp32 output.
Kernels import nothing from the rest of qlora; the code books arrive as tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from qlora.kernels.packed import Packed4bit


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed weight as a flat uint8 view, whatever its storage dtype.

    Never convert: a float storage dtype only reinterprets the bytes, and arithmetic on them
    would canonicalise NaN bit patterns and silently corrupt the weight.
    """
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    return packed.reshape(-1)


def decode_absmax(
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """fp32 per-block scales; with double quantization, code[q] * nested_absmax[block] + offset."""
    if nested_absmax is None:
        return absmax.float()
    values = nested_code[absmax.long()]
    n = values.numel()
    full = n - n % nested_blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, nested_blocksize) * nested_absmax[: full // nested_blocksize, None]).view(-1)
    if full < n:
        out[full:] = values[full:] * nested_absmax[-1]
    return out + offset


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    # All 256 bytes decoded at once: row b holds (code[b >> 4], code[b & 15]), high nibble first.
    byte = torch.arange(256, device=code.device)
    return torch.stack((code[byte >> 4], code[byte & 15]), dim=-1)


def dequantize_4bit_torch(weight: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """Packed 4-bit codes -> a dense [out, in] tensor in `dtype` (products in fp32, one cast)."""
    n = weight.numel
    blocksize = weight.blocksize
    scales = decode_absmax(weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset,
                           weight.nested_blocksize)
    # index_select gathers ~2x faster on CPU than advanced indexing with the same int32 index.
    values = _byte_table(weight.code.float()).index_select(0, as_bytes(weight.packed).int()).view(-1)[:n]
    # Scaled in place in fp32, then cast once: a multiply writing a bf16 `out` directly computes
    # the same roundings but runs ~7x slower on CPU (60 vs 8 ms for 16.8M weights).
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < n:
        values[full:].mul_(scales[-1])
    return values.to(dtype).view(*weight.shape)


def linear_dequantized(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Y = X W^T + b with W already dequantized to x's dtype."""
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def linear_dequantized_grad_input(grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dX = dY W; W [out, in] is already laid out as [reduction, output] for this product."""
    return grad_output @ weight


# ---- 8-bit AdamW ------------------------------------------------------------------------------
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
    """One AdamW step on a 1-D parameter whose moments are kept in 8 bits, all tensors updated in place.

    exp_avg (signed map) and exp_avg_sq (unsigned map) are uint8 codes with one fp32 absmax per
    `blocksize` elements. The moments are decoded, updated in fp32, used for the parameter update
    at full precision, and only then re-quantized with fresh per-block absmax (as bitsandbytes'
    blockwise 8-bit optimizers do). The parameter update is torch.optim.AdamW's formula.
    """
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
