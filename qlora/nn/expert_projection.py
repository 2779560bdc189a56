"""One projection of an experts module over rows sorted by expert: the 4-bit (or dense) stack's
grouped product plus the LoRA terms qlora.lora_experts put on it. Shared by qlora's experts
implementation (qlora.nn.experts_interface) and the modules that compute their own stacks
(qlora.nn.bmm_experts)."""
from __future__ import annotations

import torch

from qlora.nn.experts import held_experts
from qlora.quant.nf4.experts import grouped_linear

_LORA = "qlora_expert_lora"  # module.__dict__ key: parameter name -> [(A [E, r, in], B [E, out, r], scaling)]


def active_lora(module: torch.nn.Module) -> dict:
    """The adapter factors qlora.lora_experts has put on `module` for the current forward."""
    return module.__dict__.setdefault(_LORA, {})


def grouped_projection(module, name: str, x_sorted: torch.Tensor, counts: torch.Tensor,
                       bounds: list[int]) -> torch.Tensor:
    """One projection `name` of an experts module over rows sorted by expert (counts [E], bounds = their
    cumulative sums): the 4-bit stack or the dense one, plus every active LoRA term."""
    stack = held_experts(module, name)
    if stack is not None:
        y = grouped_linear(x_sorted, stack, counts)
    else:  # kept 16-bit (skip_modules): the dense stack, one expert at a time
        dense = getattr(module, name)
        pieces = [x_sorted.new_empty(0, dense.shape[2] if module.is_transposed else dense.shape[1])]
        for e in range(len(bounds) - 1):
            if bounds[e] < bounds[e + 1]:
                w = dense[e].to(x_sorted.dtype)
                rows = x_sorted[bounds[e]:bounds[e + 1]]
                pieces.append(rows @ w if module.is_transposed else rows @ w.t())
        y = torch.cat(pieces)
    for lora_a, lora_b, scaling in active_lora(module).get(name, ()):
        pieces = [y.new_zeros(0, y.shape[1])]
        for e in range(len(bounds) - 1):
            if bounds[e] < bounds[e + 1]:
                rows = x_sorted[bounds[e]:bounds[e + 1]].to(lora_a.dtype)
                pieces.append((rows @ lora_a[e].t()) @ lora_b[e].t())
        y = y + (torch.cat(pieces) * scaling).to(y.dtype)
    return y
