"""Experts modules that compute their stacks themselves, replaced by a qlora module with the same forward.

Most transformers 5 families compute experts through `ExpertsInterface` (qlora.nn.experts_interface
plugs into it). Llama-4's text model does not: `Llama4TextExperts` holds `gate_up_proj` [E, H, 2I]
and `down_proj` [E, I, H] (input dim first: the transpose of Qwen3's / Mixtral's [E, out, in]) and
multiplies them with `torch.bmm` in its own forward, so a 4-bit stack on it would never be used.

As replace_linear_layers swaps an nn.Linear for a 4-bit layer, `replace_bmm_experts` swaps such a
module for `BmmExperts`: the same Parameters under the same names (so the checkpoint's fused tensors,
PEFT's `target_parameters` and FSDP2 find them where they find the dense ones), the same call
contract (rows already sorted by expert, E equal slices, already scaled by the router), and each
projection through `grouped_projection`, the step qlora's experts implementation runs: the 4-bit
grouped matmul plus any LoRA term. It declares itself transposed, like gpt-oss's experts, so the
stack is held [E, out, in] with gate and up quantized apart: the matrices bitsandbytes holds for
Llama-4, where transformers builds a bitsandbytes checkpoint's experts as `SequentialLlama4TextExperts`
(one nn.Linear per expert and projection).

The table below is keyed by class name, as transformers' own `MODULES_TO_PATCH_FOR_QUANTIZATION` is.
"""
from __future__ import annotations

import torch
from torch import nn

from qlora.nn.expert_projection import grouped_projection

# Class names of the modules whose forward is `x.view(E, -1, H) @ gate_up_proj -> chunk(2) ->
# (up * act(gate)) @ down_proj` over attributes num_experts, hidden_size, expert_dim, act_fn.
BMM_EXPERTS_CLASSES = {"Llama4TextExperts"}


class BmmExperts(nn.Module):
    """Llama-4's text experts, computed by qlora: every expert applies to its own equal slice of the rows
    (rows of tokens the router did not pick are zero, as transformers' Llama4TextMoe makes them)."""

    # What qlora's expert code reads off an experts module (transformers' `@use_experts_implementation`
    # sets the same on its modules): a gated [E, in, out] stack, computed here, no expert parallelism.
    has_gate = True
    has_bias = False
    is_transposed = True
    _is_expert_parallel = False
    # gate and up are two matrices per expert, quantized apart (each its own absmax blocks and offset),
    # as the per-expert nn.Linear of bitsandbytes' swap holds them.
    stack_segments = {"gate_up_proj": 2}
    # Stock PEFT, on the Llama4TextExperts this replaces (no is_transposed there), reads [E, H, 2I] as
    # [E, out, in]; qlora.lora_experts keeps that adapter layout, so the adapter loads on the 16-bit model.
    peft_reads_as_out_in = True
    # A bitsandbytes checkpoint's names for each expert's matrices (SequentialLlama4TextExperts' Linear4bit:
    # `experts.{e}.gate_proj.weight`, ...), in segment order; qlora.models.expert_checkpoint reads and writes them.
    checkpoint_matrices = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

    def __init__(self, original: nn.Module):
        super().__init__()
        self.num_experts = original.num_experts
        self.hidden_size = original.hidden_size
        self.expert_dim = original.expert_dim
        self.act_fn = original.act_fn
        self.gate_up_proj = original.gate_up_proj  # [E, H, 2I], the checkpoint's own layout
        self.down_proj = original.down_proj  # [E, I, H]
        self.replaces = type(original).__name__

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)
        if x.shape[0] % self.num_experts:
            raise ValueError(f"{self.replaces}: {x.shape[0]} rows do not split into {self.num_experts} experts' "
                             "equal slices (the caller repeats every token once per expert)")
        rows = x.shape[0] // self.num_experts
        counts = torch.full((self.num_experts,), rows, dtype=torch.long, device=x.device)  # the kernel reads them there
        bounds = [e * rows for e in range(self.num_experts + 1)]
        gate, up = grouped_projection(self, "gate_up_proj", x, counts, bounds).chunk(2, dim=-1)
        return grouped_projection(self, "down_proj", up * self.act_fn(gate), counts, bounds)

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}, num_experts={self.num_experts}, hidden_size={self.hidden_size}, " \
               f"expert_dim={self.expert_dim}"


def replace_bmm_experts(model: nn.Module, skip=lambda name: False) -> list[str]:
    """Swap every module of BMM_EXPERTS_CLASSES (not kept 16-bit by `skip`) for a BmmExperts holding the
    same Parameters; returns the swapped module names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ not in BMM_EXPERTS_CLASSES or skip(name):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, BmmExperts(module))
        swapped.append(name)
    return swapped
