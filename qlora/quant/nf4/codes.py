"""The code books of the bitsandbytes 4-bit format.

The values are part of the on-disk format: checkpoints store them as `quant_map` /
`nested_quant_map`, and the tests pin them against bitsandbytes and golden bytes.
"""
from __future__ import annotations

import functools

import torch

from qlora.kernels.nf4.format import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE  # noqa: F401  (re-exported

QUANT_TYPES = ("nf4", "fp4")

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA paper, appendix E); index order = value order.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (E2M1) as bitsandbytes lays it out: sign in bit 3, magnitudes not sorted, two +0.0 entries.
# bitsandbytes builds it as the integers below divided (in fp32) by their max, 12.
_FP4_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        unscaled = torch.tensor(_FP4_UNSCALED, dtype=torch.float32)
        return unscaled / unscaled.abs().max()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def get_4bit_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 code values of `quant_type` ("nf4" or "fp4"), indexed by the 4-bit code."""
    return _code_cpu(quant_type).to(device)


@functools.lru_cache(maxsize=None)
def _quantize_bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    # argsort is deliberately the default (unstable) one: with FP4's two equal zeros, the index a
    # zero maps to is whatever this call yields, and bitsandbytes' CPU quantizer makes the same call.
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


def quantize_bounds(quant_type: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision midpoints between sorted code values, and the sorted-position -> code-index map."""
    midpoints, order = _quantize_bounds_cpu(quant_type)
    return midpoints.to(device), order.to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool = True) -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): for each decimal
    # exponent e in -6..0, fp32 midpoints of linspace(0.1, 1) scaled by 10**e (2**(e+6) of them per
    # sign when signed, 2**(e+7) positive ones when not); plus 0 and 1.0. The arithmetic (fp32
    # linspace and scaling) is part of the format.
    values: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu", signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code (256 sorted fp32 values).

    The signed map double-quantizes the 4-bit absmax and holds the 8-bit optimizers' first moment;
    the unsigned one (all 256 codes on [0, 1]) holds their second moment, which is never negative.
    """
    return _dynamic_map_cpu(signed).to(device)
