"""qlora's experts implementation, registered in transformers' ExpertsInterface as "qlora".

The same steps as transformers' `grouped_mm_experts_forward` (sort the (token, expert) pairs by
expert, one grouped matmul per projection, gate, weight by the router, unsort, sum over top-k),
with each projection a `grouped_linear` over the 4-bit stack (or the dense stack where
skip_modules kept it 16-bit), plus the LoRA term where qlora.lora_experts put adapters on the
stack: y_e += scaling * (x_e A_e^T) B_e^T, without ever forming W_e + B_e A_e.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from qlora.nn.expert_projection import grouped_projection
from qlora.nn.experts import expert_parameter_names, hold_experts, is_experts_module, logical_shape, quantized_stacks

EXPERTS_IMPLEMENTATION = "qlora"
log = logging.getLogger(__name__)

def qlora_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    if self._is_expert_parallel:
        raise NotImplementedError("qlora's experts implementation does not run expert parallelism; shard the "
                                  "experts with distributed=fsdp2 instead")
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape[0], hidden_states.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids_sorted, perm = torch.sort(expert_ids, stable=True)
    x_sorted = hidden_states[perm // num_top_k]
    counts = torch.bincount(expert_ids_sorted, minlength=self.num_experts)
    bounds = [0] + torch.cumsum(counts, 0).tolist()

    first = "gate_up_proj" if self.has_gate else "up_proj"
    proj = grouped_projection(self, first, x_sorted, counts, bounds)
    if self.has_bias:
        proj = proj + getattr(self, f"{first}_bias")[expert_ids_sorted].to(proj.dtype)
    proj = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)
    proj = grouped_projection(self, "down_proj", proj, counts, bounds)
    if self.has_bias:
        proj = proj + self.down_proj_bias[expert_ids_sorted].to(proj.dtype)
    if self.has_post_expert_norm:
        proj = self.post_expert_norm(proj)

    weighted = proj * sample_weights[perm].unsqueeze(-1).to(proj.dtype)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    # Summed over top-k in fp32 as transformers' own implementations do (deterministic, no index_add_).
    out = weighted[inverse].view(num_tokens, num_top_k, hidden_dim).float().sum(dim=1)
    return out.to(hidden_states.dtype)


def replace_expert_parameters(model: nn.Module, qconfig, skip=lambda name: False) -> list[str]:
    """Give every experts module of `model` 4-bit placeholders of its expert matrices (on their device,
    meta while a skeleton is built) and switch the model to the "qlora" experts implementation; an
    experts module that computes its own stacks (Llama-4's) is first swapped for qlora's
    (qlora.nn.bmm_experts). Returns the full names of the quantized parameters."""
    from qlora.quant.experts import expert_weight_class

    from qlora.nn.bmm_experts import replace_bmm_experts
    from qlora.nn.experts import expert_segments

    replace_bmm_experts(model, skip)  # Llama-4's experts bmm their own stacks: a qlora module computes them
    names, segments = [], expert_segments(model)
    for module_name, module in model.named_modules():
        if not is_experts_module(module) or skip(module_name):
            continue
        weight_cls = expert_weight_class(qconfig.format)
        for name in expert_parameter_names(module):
            if skip(f"{module_name}.{name}"):
                continue
            dense = getattr(module, name)
            e, out_features, in_features = logical_shape(module, name)
            options = {k: v for k, v in qconfig.weight_options().items() if k != "format"}
            count = segments.get(f"{module_name}.{name}", getattr(module, "stack_segments", {}).get(name, 1))
            if count > 1:
                options["segments"] = count
            hold_experts(module, name, weight_cls.placeholder(e, out_features, in_features, dense.device,
                                                              qconfig.compute_dtype, **options))
            names.append(f"{module_name}.{name}")
    if names:
        use_qlora_experts(model)
    held = {f"{m}.{p}" for m, _, p in quantized_stacks(model)}
    # Expert stacks of a module that computes them itself and that qlora.nn.bmm_experts does not know:
    # quantizing them would need changing that module's code.
    dense = [(n, list(p.shape)) for n, p in model.named_parameters()
             if p.dim() == 3 and p.is_floating_point() and n not in held and not skip(n.rpartition(".")[0])]
    if dense:
        log.warning("%s: %d expert stacks stay 16-bit (%s %s, ...): their module does not compute through "
                    "transformers' experts interface, which qlora's 4-bit experts plug into", type(model).__name__,
                    len(dense), *dense[0])
    return names


def use_qlora_experts(model: nn.Module) -> None:
    """Route the model's experts through qlora's implementation (registered in transformers' ExpertsInterface)."""
    register_experts_implementation()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    for module in model.modules():  # sub-models built from a config that the call above did not reach
        config = getattr(module, "config", None)
        if is_experts_module(module) and config is not None and config._experts_implementation != EXPERTS_IMPLEMENTATION:
            config._experts_implementation = EXPERTS_IMPLEMENTATION


def register_experts_implementation() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, qlora_experts_forward)


def generation_options(model: nn.Module) -> dict:
    """Keyword arguments for `generate` on a model whose config asks for router logits: none. transformers
    computes the load-balancing loss in every forward then, and with a padded batch and a KV cache its
    attention mask covers the whole sequence while the router logits cover the new tokens only (Mixtral:
    "size of tensor a (16) must match ... (976)"). A loss is no use while generating."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return {"output_router_logits": False} if getattr(getattr(inner, "config", None), "output_router_logits", False) \
        else {}

