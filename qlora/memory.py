"""Memory accounting of a model."""
from __future__ import annotations

from torch import nn


def memory_footprint(model: nn.Module, buffers: bool = True, quant_state: bool = True) -> int:
    """Bytes held by the model's parameters (and buffers), each shared tensor counted once.

    quant_state: count the quantized layers' scales (NF4 + double quant then comes to ~4.127 bits
    per weight; LLM.int8 adds 4 bytes of SCB per output row). They are buffers here; bitsandbytes
    keeps them as attributes of its parameters, so transformers' get_memory_footprint() does not
    see them: quant_state=False counts what it counts, byte for byte.
    """
    from qlora.nn.quantized import QuantizedLinear

    excluded = set()
    if not quant_state:
        excluded = {id(b) for m in model.modules() if isinstance(m, QuantizedLinear)
                    for name, b in m.named_buffers(recurse=False) if b is not None}
    tensors = list(model.parameters())
    if buffers:
        tensors += [b for b in model.buffers() if id(b) not in excluded]
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
