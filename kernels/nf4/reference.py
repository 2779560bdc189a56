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

from qlora.kernels.nf4.packed import Packed4bit


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
