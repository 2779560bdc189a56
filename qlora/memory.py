"""Memory accounting of a model."""
from __future__ import annotations

from torch import nn


def memory_footprint(model: nn.Module, buffers: bool = True) -> int:
    """Bytes held by the model's parameters (and buffers), each shared tensor counted once.

    Like transformers' get_memory_footprint(), but the 4-bit layers' scales are buffers here, so
    they are counted: NF4 + double quant comes to ~4.127 bits per quantized weight.
    """
    tensors = list(model.parameters())
    if buffers:
        tensors += list(model.buffers())
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
