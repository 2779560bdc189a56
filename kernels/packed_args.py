"""How a packed weight crosses the custom-op and autograd boundaries, for every format.

A format's packed weight is a NamedTuple of tensors and layout fields, its shape [out, in] last
(nf4.packed.Packed4bit, gptq.format.PackedGPTQ). torch.library ops take flat arguments, so the
fields become a schema fragment and come back with `from_op_args`; autograd saves tensors only
through save_for_backward, so the layout fields travel as plain attributes of ctx.
"""
from __future__ import annotations

from typing import Optional, get_type_hints

import torch

_SCHEMA_TYPES = {torch.Tensor: "Tensor", Optional[torch.Tensor]: "Tensor?", int: "SymInt", tuple[int, int]: "SymInt[]",
                 tuple[int, int, int]: "SymInt[]"}


def op_schema(packed_type: type) -> str:
    """The fields of `packed_type` as a torch.library schema fragment, in field order: every custom
    op of the format is declared with it, so the argument list is written once, in the NamedTuple."""
    return ", ".join(f"{_SCHEMA_TYPES[hint]} {name}" for name, hint in get_type_hints(packed_type).items())


def from_op_args(packed_type: type, args: tuple) -> tuple:
    """(the weight, the op's remaining arguments) from a custom op's flat arguments, which begin with
    the weight's fields (the shape arrives as a list)."""
    count = len(packed_type._fields)
    *fields, shape = args[:count]
    return packed_type(*fields, tuple(shape)), args[count:]


def fake_product(a: torch.Tensor, weight, transpose_weight: bool) -> torch.Tensor:
    """The output of a product op without computing it (register_fake): a @ W^T is [M, out],
    a @ W (the backward to the input) is [M, in]."""
    return a.new_empty((a.shape[0], weight.shape[0] if transpose_weight else weight.shape[1]))


def save_weight(ctx, weight) -> None:
    """Save the packed weight for backward: its tensors through save_for_backward (autograd's
    bookkeeping), its layout fields as attributes. The packed bytes, never a dense copy of W."""
    ctx.save_for_backward(*(t for t in weight if isinstance(t, torch.Tensor)))
    ctx.weight_slots = tuple(i for i, t in enumerate(weight) if isinstance(t, torch.Tensor))
    ctx.weight_fields = tuple(None if isinstance(t, torch.Tensor) else t for t in weight)


def saved_weight(ctx, packed_type: type):
    """The weight save_weight saved."""
    fields = list(ctx.weight_fields)
    for slot, tensor in zip(ctx.weight_slots, ctx.saved_tensors):
        fields[slot] = tensor
    return packed_type(*fields)
