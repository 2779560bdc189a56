"""Quantized mixture-of-experts: expert stacks held on transformers' own experts modules, computed
through transformers' experts interface (qlora.nn.experts_interface).

transformers 5 holds a layer's experts as fused 3-D Parameters on one module (`gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]; gpt-oss transposed, [E, H, 2I]) whose forward dispatches through
`ExpertsInterface` by `config._experts_implementation`. qlora registers its implementation there
under "qlora" (qlora.nn.experts_interface): the model's router, top-k, shared experts and
load-balancing loss stay transformers' code; only the expert matmuls are ours.

On the module, a quantized stack replaces the Parameter under the same name: the packed bytes
[E, bytes per expert] are the frozen Parameter `gate_up_proj` (so PEFT's `target_parameters` and
FSDP2 find it where they find the dense one, and FSDP2 shards whole experts along dim 0), the rest
of the state is non-persistent buffers `gate_up_proj_absmax`, ... Float state (absmax without
double quant, nested_absmax, offset, code books) is held as its uint8 bytes: `model.to(bf16)` casts
every float buffer, which would corrupt fp32 scales (Linear4bit guards its own `_apply`; a
transformers module has none of ours). The stack is always stored [E, out, in] (gpt-oss's
transposed layout is transposed once, when it is quantized).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qlora.quant.nf4.experts import ExpertWeight4bit, grouped_linear  # noqa: F401 (the dispatch, re-exported)

_HELD = "qlora_expert_stacks"  # module.__dict__ key: parameter name -> (template, {field: dtype})


# ---- which modules and parameters ----------------------------------------------------------------
def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module that dispatches through ExpertsInterface (`@use_experts_implementation`
    sets these attributes on every instance)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "_is_expert_parallel"))


def expert_parameter_names(module: nn.Module) -> list[str]:
    """The 3-D expert matrices of an experts module (its biases are 2-D and stay dense)."""
    names = ("gate_up_proj", "up_proj", "down_proj") if getattr(module, "has_gate", True) else ("up_proj", "down_proj")
    held = module.__dict__.get(_HELD, {})
    return [n for n in names if n in held or (isinstance(getattr(module, n, None), torch.Tensor)
                                               and getattr(module, n).dim() == 3)]


def logical_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(E, out, in) of a parameter, held quantized or still dense (in the module's own layout)."""
    held = module.__dict__.get(_HELD, {})
    if name in held:
        return tuple(held[name][0].shape)
    e, a, b = getattr(module, name).shape
    return (e, b, a) if getattr(module, "is_transposed", False) else (e, a, b)


def expert_segments(model: nn.Module) -> dict[str, int]:
    """Parameter name -> how many separately stored matrices each expert of it is, by the model's own
    conversion mapping: gate_up_proj is built from gate_proj and up_proj (2) in every family whose
    checkpoints store them apart, whatever layout this checkpoint has. Each is quantized on its own,
    as bitsandbytes quantized them (qlora.quant.nf4.experts, "Segments")."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return {}
    found = {}
    for converter in get_model_conversion_mapping(model):
        operations = getattr(converter, "operations", ())
        if not any(type(op).__name__ == "Concatenate" for op in operations):
            continue
        for pattern in converter.target_patterns:
            tail = pattern.lstrip(".^").rstrip("$")
            for name, _ in model.named_parameters():
                if name == tail or name.endswith("." + tail):
                    found[name] = len(converter.source_patterns)
    return found


# ---- holding a quantized stack on the module --------------------------------------------------------
def hold_experts(module: nn.Module, name: str, weight: ExpertWeight4bit) -> None:
    """Put a quantized [E, out, in] stack on `module` in place of its Parameter `name`."""
    previous = module.__dict__.get(_HELD, {}).get(name)
    if previous is not None:  # another format's state (an NF4 placeholder replaced by MXFP4 as read)
        for field in previous[1]:
            module._buffers.pop(f"{name}_{field}", None)
    tensors = weight.tensors()
    packed = tensors.pop(weight.data_name)
    module._parameters[name] = nn.Parameter(packed, requires_grad=False)
    dtypes = {}
    for field, tensor in tensors.items():
        key = f"{name}_{field}"
        module._buffers.pop(key, None)
        if tensor is None:
            continue
        dtypes[field] = (tensor.dtype, tuple(tensor.shape))
        module.register_buffer(key, tensor.contiguous().reshape(-1).view(torch.uint8), persistent=False)
    module.__dict__.setdefault(_HELD, {})[name] = (weight, dtypes)


def held_experts(module: nn.Module, name: str) -> Optional[ExpertWeight4bit]:
    """The quantized stack `name` of `module`, rebuilt on its current tensors; None when it is dense."""
    held = module.__dict__.get(_HELD, {})
    if name not in held:
        return None
    template, dtypes = held[name]
    current = {template.data_name: module._parameters[name]}
    for field in template.tensors():
        if field == template.data_name:
            continue
        if field not in dtypes:
            current[field] = None
            continue
        dtype, shape = dtypes[field]
        current[field] = module._buffers[f"{name}_{field}"].view(dtype).view(shape)
    return template.replace(**current)


def held_state(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The stack `name`'s state (absmax, code books, ...): field -> the uint8 buffer holding its bytes."""
    return {field: module._buffers[f"{name}_{field}"] for field in module.__dict__.get(_HELD, {})[name][1]}


def quantized_stacks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every quantized expert stack of `model`."""
    return [(mname, m, p) for mname, m in model.named_modules() for p in m.__dict__.get(_HELD, {})]


def set_dense_experts(module: nn.Module, name: str, dense: torch.Tensor, first: Optional[int] = None) -> None:
    """Quantize dense experts in the module's own layout (gpt-oss: [E, in, out]) into the held stack:
    the whole stack, or with `first` the experts first, first + 1, ... (a loader streaming a few at a time).
    A stack still on meta (a skeleton's placeholder) is allocated on `dense`'s device first."""
    template = held_experts(module, name)
    if template.packed.is_meta:
        template = type(template).placeholder(*template.shape, device=dense.device, compute_dtype=template.dtype,
                                              quant_type=template.quant_type, blocksize=template.blocksize,
                                              double_quant=template.double_quant, quant_storage=template.packed.dtype,
                                              **({"segments": template.segments} if template.segments > 1 else {}))
        hold_experts(module, name, template)
    quantize_into(template, module.is_transposed, name, dense, first)


def quantize_into(stack: ExpertWeight4bit, transposed: bool, name: str, dense: torch.Tensor,
                  first: Optional[int] = None) -> None:
    """Quantize dense experts ([count, in, out] where `transposed`, else [count, out, in]) into experts
    first, first + 1, ... of `stack` (all of them without `first`), one expert at a time."""
    e, out_features, in_features = stack.shape
    matrix_shape = (in_features, out_features) if transposed else (out_features, in_features)
    count = e if first is None else dense.shape[0]
    start = first or 0
    if dense.dim() != 3 or tuple(dense.shape[1:]) != matrix_shape or start + count > e or \
            (first is None and dense.shape[0] != e):
        expected = [count, *matrix_shape] if first is not None else [e, *matrix_shape]
        raise ValueError(f"{name}: shape {list(dense.shape)}, the model built from config.json expects {expected}")
    for i in range(count):
        matrix = dense[i].t() if transposed else dense[i]
        stack.set_expert(start + i, matrix.to(stack.device))
