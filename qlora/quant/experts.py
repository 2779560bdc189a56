"""Which weight type holds a format's mixture-of-experts stacks ([E, out, in], see qlora.nn.experts)."""
from __future__ import annotations

from qlora.quant.weight import QuantizedWeight, get_format

# Formats whose expert stacks cannot be built here, and why (one line for the user).
_REFUSED = {
    "int8": "LLM.int8 finds outlier columns from each batch's activations, per layer; its expert form "
            "(per-expert row scales plus outlier decomposition inside the grouped matmul) is not implemented",
    "gptq": "GPTQ quantizes each matrix from calibration activations of the tokens routed to it, which a "
            "streaming load does not have per expert",
}


def expert_weight_class(format_name: str) -> type[QuantizedWeight]:
    """The registered "<format>-experts" weight type; a ValueError naming the format when there is none."""
    try:
        return get_format(f"{format_name}-experts")
    except ValueError:
        why = _REFUSED.get(format_name, "no expert stack type is registered for it")
        raise ValueError(
            f"quant format {format_name!r} cannot quantize mixture-of-experts weights: {why}. Use quant=nf4 (or fp4) "
            "for the experts, or keep them 16-bit with quant.skip_modules=[experts]") from None
