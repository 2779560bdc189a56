"""Quantized mixture-of-experts stacks in checkpoints: read as bitsandbytes wrote them, written the same way.

The layout is the one transformers 4.x + bitsandbytes wrote for MoE models (and the Hub's
`*-bnb-4bit` MoE checkpoints hold): one 4-bit weight per expert and projection, each with its own
quant_state entries (`mlp.experts.3.gate_proj.weight`, `...weight.absmax`, `...weight.quant_map`,
...). A stack built from several such matrices keeps each one as it is (qlora.quant.nf4.experts,
"Segments"), so reading copies bytes and writing gives back the same bytes: nothing is re-quantized.

Names come from transformers' own conversion mapping in both directions: the loader groups the
per-expert keys by the converter that merges them (qlora.models.conversion), and the writer names
each (expert, matrix) with `revert_weight_conversion`, the function `save_pretrained` uses. A family
whose checkpoints hold fused stacks (gpt-oss) has no per-expert names: its stacks are written as
`<stack>.<expert>.weight` + quant_state entries, which only qlora reads.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import torch

from qlora.models.checkpoint import ShardReader
from qlora.models.conversion import ConvertedTarget, check_expert_sources
from qlora.nn.experts import held_experts, hold_experts, quantized_stacks
from qlora.quant.nf4.weight import Weight4bit

logger = logging.getLogger(__name__)
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


# ---- reading --------------------------------------------------------------------------------------
def _placed_stack(model, name: str, device):
    """The held stack `name`, given real storage on `device` if it is still a meta placeholder."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    stack = held_experts(module, attr)
    if stack is None:
        raise ValueError(f"{name}: the checkpoint holds it quantized per expert, but quant.skip_modules keeps these "
                         "experts 16-bit; drop them from skip_modules to load the checkpoint as it is")
    if stack.device != torch.device(device) or stack.packed.is_meta:
        stack = type(stack).placeholder(*stack.shape, device=device, compute_dtype=stack.dtype,
                                        quant_type=stack.quant_type, blocksize=stack.blocksize,
                                        double_quant=stack.double_quant, quant_storage=stack.packed.dtype,
                                        segments=stack.segments)
        hold_experts(module, attr, stack)
    return stack


def _weight_entries(reader: ShardReader, key: str, device) -> tuple[Weight4bit, list[str]]:
    """One bitsandbytes 4-bit weight (its packed bytes under `key`, its state under `key.*`) and the keys read."""
    keys = [key] + [k for k in reader.with_prefix(key + ".")]
    tensors = {"weight": reader.get(key), **{"weight." + k[len(key) + 1:]: reader.get(k) for k in keys[1:]}}
    return Weight4bit.from_checkpoint(tensors, device=device, where=f"{reader.file_of(key)}: {key}"), keys


def load_prequantized_target(model, reader: ShardReader, target: ConvertedTarget, device) -> list[str]:
    """Fill the stack `target.name` from its per-expert 4-bit weights, byte for byte. Returns the keys read."""
    check_expert_sources(model, reader, target)
    stack = _placed_stack(model, target.name, device)
    patterns = list(target.converter.source_patterns)
    if stack.segments not in (1, len(patterns)):
        raise ValueError(f"{target.name}: built from {len(patterns)} checkpoint matrices per expert, the stack "
                         f"holds {stack.segments}")
    position = _varying_index([key for _, key in target.sources])
    used = []
    for pattern, key in target.sources:
        expert = int(_INDEX.findall(key)[position]) if position is not None else 0
        weight, keys = _weight_entries(reader, key, stack.device)
        try:
            stack.set_segment(expert, patterns.index(pattern) if stack.segments > 1 else 0, weight.packed, weight.state)
        except ValueError as err:
            raise ValueError(f"{reader.file_of(key)}: {key}: {err}") from None
        used += keys
    return used


def load_prequantized_fused(model, reader: ShardReader, name: str, key: str, device) -> Optional[list[str]]:
    """Fill the stack `name` from `<key>.<expert>[.<matrix>].weight` entries (what `expert_checkpoint_tensors`
    writes for a family without per-expert names; bitsandbytes' names where the module knows them, see
    `_fused_entry`). None when the checkpoint has no such entries."""
    module_name, _, attr = name.rpartition(".")
    if held_experts(model.get_submodule(module_name), attr) is None:
        return None
    stack = _placed_stack(model, name, device)
    module = model.get_submodule(module_name)
    used = []
    for e in range(stack.num_experts):
        for s in range(stack.segments):
            entry = _fused_entry(module, attr, key, e, s, stack.segments)
            if not reader.has(entry):
                if e == 0 and s == 0:
                    return None
                first = _fused_entry(module, attr, key, 0, 0, stack.segments)
                raise ValueError(f"{reader.file_of(first)}: expert {e} of {name} is missing (no tensor {entry}); the "
                                 "checkpoint is incomplete")
            weight, keys = _weight_entries(reader, entry, stack.device)
            try:
                stack.set_segment(e, s, weight.packed, weight.state)
            except ValueError as err:
                raise ValueError(f"{reader.file_of(entry)}: {entry}: {err}") from None
            used += keys
    return used


def _fused_entry(module, attr: str, key: str, expert: int, segment: int, segments: int) -> str:
    """The checkpoint name of one (expert, matrix) of a stack `key` whose family names no per-expert tensors:
    bitsandbytes' own names where the module knows them (Llama-4: `experts.{e}.gate_proj.weight`), else
    qlora's `<stack>.<expert>[.<matrix>].weight`."""
    names = getattr(module, "checkpoint_matrices", {}).get(attr)
    if names is not None:
        return f"{key.rpartition('.')[0]}.{expert}.{names[segment]}.weight"
    return f"{key}.{expert}.weight" if segments == 1 else f"{key}.{expert}.{segment}.weight"


def is_4bit_entry(reader: ShardReader, key: str) -> bool:
    """`key` is a bitsandbytes 4-bit weight (it has a quant_state entry beside it)."""
    return any(reader.has(f"{key}.quant_state.bitsandbytes__{t}") for t in ("nf4", "fp4"))


def dequantized_dense(reader: ShardReader, key: str, param: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """A 4-bit weight in the checkpoint where the model holds a plain 16-bit Parameter (a router, which
    transformers 5 builds as its own module, not an nn.Linear; bitsandbytes quantized it as one):
    dequantized once to the parameter's dtype. Returns the tensor and the keys read."""
    weight, keys = _weight_entries(reader, key, "cpu")
    logger.info("%s: stored in 4 bits, held 16-bit by the model (dequantized once)", key)
    return weight.dequantize(param.dtype).view(weight.shape), keys


def is_mxfp4_config(saved) -> bool:
    """config.json's quantization_config is gpt-oss's MXFP4 one (experts in MXFP4, everything else 16-bit)."""
    saved = saved.to_dict() if hasattr(saved, "to_dict") else saved
    return isinstance(saved, dict) and saved.get("quant_method") == "mxfp4"


def load_mxfp4_stack(model, reader: ShardReader, name: str, device) -> list[str]:
    """Hold `name`'s `<name>_blocks` / `<name>_scales` as an MXFP4 stack, the published bytes as they are.
    The stack is [E, out, in] like every stack, which is the checkpoint's own order (the module's
    transposed [E, in, out] is what transformers dequantizes into)."""
    from qlora.quant.mxfp4 import ExpertWeightMXFP4

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    template = held_experts(module, attr)
    blocks_key, scales_key = f"{name}_blocks", f"{name}_scales"
    if not reader.has(scales_key):
        raise ValueError(f"{reader.file_of(blocks_key)}: {blocks_key} has no {scales_key} beside it; the checkpoint "
                         "is incomplete")
    dtype = template.dtype if template is not None else getattr(module, attr).dtype
    stack = ExpertWeightMXFP4.from_blocks(reader.get(blocks_key), reader.get(scales_key), dtype, device,
                                          where=f"{reader.file_of(blocks_key)}: {blocks_key}")
    expected = tuple(template.shape) if template is not None else None
    if expected is not None and tuple(stack.shape) != expected:
        raise ValueError(f"{reader.file_of(blocks_key)}: {blocks_key} holds experts of {list(stack.shape)}, the model "
                         f"built from config.json expects {list(expected)}; the config and the weights do not match")
    hold_experts(module, attr, stack)
    return [blocks_key, scales_key]


def _varying_index(keys: list[str]) -> Optional[int]:
    """Which numeric part of the keys is the expert index (the one that varies; the last one for a single key)."""
    indices = [_INDEX.findall(k) for k in keys]
    if not indices or not indices[0]:
        return None
    varying = [p for p in range(len(indices[0])) if len({i[p] for i in indices if len(i) > p}) > 1]
    return varying[0] if varying else len(indices[0]) - 1


# ---- writing --------------------------------------------------------------------------------------
def expert_checkpoint_tensors(model) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(checkpoint entries of every quantized expert stack, the model state-dict names they replace).

    Each (expert, matrix) is named by transformers' `revert_weight_conversion`, fed an index tensor in
    place of the stack: its converters split and rename the index exactly as they would the weights,
    so the value that arrives under a name says which expert and matrix that name is."""
    from transformers.core_model_loading import revert_weight_conversion

    entries, replaced = {}, set()
    for module_name, module, attr in quantized_stacks(model):
        name, stack = f"{module_name}.{attr}", held_experts(module, attr)
        replaced.add(name)
        if not hasattr(stack, "segment"):  # MXFP4: the published `<name>_blocks` / `<name>_scales`, as read
            entries.update({f"{name}_{k}": v.contiguous() for k, v in stack.checkpoint_tensors().items()})
            continue
        e, s = stack.num_experts, stack.segments
        index = torch.arange(e * s, dtype=torch.float64).view(e, s, 1)
        index = index.transpose(1, 2) if module.is_transposed else index  # the module's own layout
        state = stack.checkpoint_tensors()
        for key, value in revert_weight_conversion(model, {name: index}).items():
            if value.numel() == 1:  # one (expert, matrix): the family's per-expert checkpoint name
                expert, matrix = divmod(int(value.item()), s)
                prefix = f"{expert}." if s == 1 else f"{expert}.{matrix}."
                base = key.removesuffix("weight")
                entries.update({base + k[len(prefix):]: v.contiguous() for k, v in state.items()
                                if k.startswith(prefix + "weight")})
            elif hasattr(module, "checkpoint_matrices"):  # bitsandbytes' per-expert names for this module
                for k, v in state.items():
                    expert, rest = k.split(".", 1)
                    matrix, rest = rest.split(".", 1) if s > 1 else ("0", rest)
                    entries[_fused_entry(module, attr, key, int(expert), int(matrix), s).removesuffix("weight")
                            + rest] = v.contiguous()
            else:  # checkpoints of this family hold the fused stack: qlora's per-expert entries under its name
                entries.update({f"{key}.{k}": v.contiguous() for k, v in state.items()})
    return entries, replaced
