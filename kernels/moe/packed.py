"""PackedExperts4bit: the 4-bit weights of E experts of one projection, as every grouped kernel takes them.

Expert e's slice of each field is exactly what bitsandbytes' quantize_4bit gives for W[e] (per-expert
double quantization, so one `offset` per expert): `expert(e)` returns it as kernels/nf4's Packed4bit,
which the twin decodes with kernels/nf4/reference.py, bit for bit what the dense 4-bit kernels decode.
The custom op (ops.py, through kernels/packed_args.py) is the only place it is flattened into arguments.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from qlora.kernels.nf4.packed import Packed4bit


class PackedExperts4bit(NamedTuple):
    """E experts of `shape` (E, out, in) in bitsandbytes' blocked 4-bit layout, one row per expert.

    packed: [E, (out*in + 1)//2] bytes, first element in the high nibble (any storage dtype, reinterpreted;
        a float storage row holds the same bytes).
    absmax: [E, ceil(out*in / blocksize)] fp32 scales, or with double quantization uint8 codes of
        (absmax - offset[e]) in `nested_code`, scaled per `nested_blocksize` codes by `nested_absmax[e]`.
    code: the 16 fp32 values a nibble decodes to (NF4 or FP4), shared by all experts.
    nested_absmax: [E, ceil(blocks / nested_blocksize)] fp32, or None without double quantization.
    nested_code: the 256 fp32 values of the 8-bit scale code, shared, or None.
    offset: [E] fp32 (mean absmax of each expert), or None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_code: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    blocksize: int
    nested_blocksize: int
    shape: tuple[int, int, int]

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def expert_shape(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[2])

    @property
    def expert_numel(self) -> int:
        return math.prod(self.expert_shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def packed_bytes(self) -> torch.Tensor:
        """`packed` as [E, bytes per expert] uint8: a view of the same bytes, never a conversion (float
        arithmetic on packed bytes would canonicalise NaN bit patterns and corrupt the weight)."""
        packed = self.packed
        if packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)
        return packed.reshape(self.num_experts, -1)

    def expert(self, e: int) -> Packed4bit:
        """Expert e as a Packed4bit [out, in]: views of its rows, the shared code books."""
        nested = None if self.nested_absmax is None else self.nested_absmax.reshape(self.num_experts, -1)[e]
        offset = None if self.offset is None else self.offset.reshape(-1)[e]
        return Packed4bit(self.packed_bytes()[e], self.absmax.reshape(self.num_experts, -1)[e], self.code, nested,
                          self.nested_code, offset, self.blocksize, self.nested_blocksize, self.expert_shape)

    @classmethod
    def stack(cls, experts: list[Packed4bit]) -> "PackedExperts4bit":
        """E Packed4bit weights of one shape and layout (each expert quantized on its own) as one stack."""
        if not experts:
            raise ValueError("an expert stack needs at least one expert, got none")
        first = experts[0]
        for e, weight in enumerate(experts):
            if (tuple(weight.shape), weight.blocksize, weight.double_quant) != (
                    tuple(first.shape), first.blocksize, first.double_quant):
                raise ValueError(f"expert {e} is {list(weight.shape)}, blocksize {weight.blocksize}, double quant "
                                 f"{weight.double_quant}; expert 0 is {list(first.shape)}, blocksize {first.blocksize}, "
                                 f"double quant {first.double_quant}: an expert stack needs one layout")

        def rows(name):
            return torch.stack([getattr(w, name).contiguous().view(torch.uint8).reshape(-1) if name == "packed"
                                else getattr(w, name).reshape(-1) for w in experts])

        double_quant = first.double_quant
        return cls(rows("packed"), rows("absmax"), first.code, rows("nested_absmax") if double_quant else None,
                   first.nested_code, rows("offset").reshape(-1) if double_quant else None, first.blocksize,
                   first.nested_blocksize, (len(experts), *first.shape))


def as_packed_experts(experts) -> PackedExperts4bit:
    """`experts` as a PackedExperts4bit: itself, or any object with the stack's fields as attributes (the
    quantized-weight type of qlora.quant holds them under the same names; kernels import nothing from it)."""
    if isinstance(experts, PackedExperts4bit):
        return experts
    missing = [name for name in PackedExperts4bit._fields if not hasattr(experts, name)]
    if missing:
        raise TypeError(f"{type(experts).__name__} is not a 4-bit expert stack: it has no {', '.join(missing)}")
    fields = {name: getattr(experts, name) for name in PackedExperts4bit._fields}
    return PackedExperts4bit(**dict(fields, shape=tuple(int(s) for s in fields["shape"])))
