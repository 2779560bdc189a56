"""Packed4bit: one packed 4-bit weight as every kernel, check and twin takes it.

The custom ops (ops.py, through kernels/packed_args.py) are the only place it is flattened into
arguments, in its field order; everything on either side of that boundary passes this one object.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch


class Packed4bit(NamedTuple):
    """The bytes, the per-block scales and the layout of a 4-bit weight of `shape` [out, in].

    packed: two codes per byte, first element in the high nibble (any storage dtype, reinterpreted).
    absmax: fp32 per block, or with double quantization uint8 codes of (absmax - offset) in
        `nested_code`, scaled per `nested_blocksize` codes by `nested_absmax`.
    code: the 16 fp32 values a nibble decodes to (NF4 or FP4).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_code: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    blocksize: int
    nested_blocksize: int
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device


def weight_strides(shape: Sequence[int], transpose_weight: bool) -> tuple[int, int, int, int]:
    """(R, cols, element stride along R, element stride along cols) of B = W^T or W."""
    out_features, in_features = shape
    if transpose_weight:
        return in_features, out_features, 1, in_features
    return out_features, in_features, in_features, 1
