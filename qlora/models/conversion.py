"""transformers' checkpoint conversion mapping, applied while streaming: one target tensor at a time.

A checkpoint written by `save_pretrained` (and every MoE checkpoint on the Hub) holds one tensor per
expert (`mlp.experts.3.gate_proj.weight`) where the model built by transformers 5 holds fused 3-D
stacks (`mlp.experts.gate_up_proj` [E, 2I, H]). `from_pretrained` merges them with the
WeightConverters of `transformers.conversion_mapping.get_model_conversion_mapping(model)`
(MergeModulelist, Concatenate, Transpose, ...). This module runs the same converters, chosen by the
same `rename_source_key`, but one target at a time, and where the converter allows (stacking
experts, concatenating gate and up) one expert at a time: the expert's tensors are read, converted,
quantized into their slot of the stack and dropped before the next are read. Peak host memory is the
quantized model plus a few of one expert's tensors in 16 bits; a converter that mixes experts
converts a whole target at once (one layer's stack, about twice, in 16 bits), never all layers'.

So every family transformers knows loads without a table of ours, in both layouts: per-expert
tensors go through their converter, already-fused tensors are renamed 1:1 like any other key.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from typing import Callable, Optional

import torch

from qlora.models.checkpoint import ShardReader


@dataclasses.dataclass
class ConvertedTarget:
    """One model tensor that transformers builds from several checkpoint tensors."""

    name: str  # the model's parameter name the converter writes (its first target)
    converter: object  # a transformers WeightConverter (copied per target, as from_pretrained does)
    sources: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (source pattern, checkpoint key)


def conversion_targets(model, reader: ShardReader) -> dict[str, ConvertedTarget]:
    """The checkpoint keys that a WeightConverter turns into model tensors, grouped by target, in
    transformers' order (natural order of the keys: expert 10 after expert 9)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    except ImportError:  # transformers < 5 has no conversion mapping and no fused experts
        return {}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not converters:
        return {}
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    expected = {name: True for name, _ in model.named_parameters(remove_duplicate=False)}
    expected.update({name: True for name, _ in model.named_buffers()})
    prefix = getattr(model, "base_model_prefix", "") or None
    targets: dict[str, ConvertedTarget] = {}
    for key in sorted(reader.keys(), key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if pattern is None or name not in expected:
            continue
        target = targets.get(name)
        if target is None:
            target = targets[name] = ConvertedTarget(name, copy.deepcopy(by_pattern[pattern]))
        target.sources.append((pattern, key))
    return targets


def load_converted(model, reader: ShardReader, target: ConvertedTarget, place: Callable[..., None]) -> list[str]:
    """Read one target's checkpoint tensors, run its converter, hand each result to `place(name, tensor)`
    and drop them. Returns the model names placed.

    A converter that stacks per-expert tensors along a new dim 0 (MergeModulelist) and otherwise only
    concatenates along other dims acts on each expert alone: it then runs once per expert, and
    `place(name, tensor, first=e)` receives [1, ...] tensors, so only one expert is ever dense in
    16 bits (not the layer's whole stack, twice, as converting them together would hold)."""
    check_expert_sources(model, reader, target)
    groups = _per_expert_groups(model, target)
    if groups is None:
        groups = [(None, target.sources)]
    placed = {}
    for first, sources in groups:
        converter = copy.deepcopy(target.converter)
        for pattern, key in sources:
            converter.add_tensor(target.name, key, pattern, lambda key=key: reader.get(key))
        results = converter.convert(target.name, model=model, config=model.config)
        for name in list(results):
            tensor = results.pop(name)
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            place(name, tensor) if first is None else place(name, tensor, first=first)
            placed[name] = True
            del tensor
    return list(placed)


def _per_expert_groups(model, target: ConvertedTarget) -> Optional[list[tuple[int, list[tuple[str, str]]]]]:
    """[(expert, its (pattern, key) sources)] when the target's converter can run one expert at a time."""
    try:
        from transformers.core_model_loading import Concatenate, MergeModulelist
    except ImportError:
        return None
    operations = getattr(target.converter, "operations", [])
    if not operations or not isinstance(operations[0], MergeModulelist) or operations[0].dim != 0:
        return None
    if not all(isinstance(op, Concatenate) and op.dim != 0 for op in operations[1:]):
        return None
    from qlora.nn.experts import held_experts

    module_name, _, attr = target.name.rpartition(".")
    if held_experts(model.get_submodule(module_name), attr) is None:  # a 16-bit stack is assigned whole
        return None
    experts = _expected_experts(model, target.name)
    keys = [key for _, key in target.sources]
    position = _expert_position(keys)
    if experts is None or position is None:
        return None
    groups: dict[int, list[tuple[str, str]]] = {}
    for pattern, key in target.sources:
        groups.setdefault(int(_INDEX.findall(key)[position]), []).append((pattern, key))
    if sorted(groups) != list(range(experts)):
        return None
    return sorted(groups.items())


_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def check_expert_sources(model, reader: ShardReader, target: ConvertedTarget) -> None:
    """One error line naming the expert and the file when a layer's per-expert tensors are incomplete
    or one of them has another shape than its siblings (checked on the safetensors headers, before
    anything is read)."""
    experts = _expected_experts(model, target.name)
    by_pattern: dict[str, list[str]] = {}
    for pattern, key in target.sources:
        by_pattern.setdefault(pattern, []).append(key)
    for pattern, keys in by_pattern.items():
        where = reader.file_of(keys[0])
        position = _expert_position(keys)
        if experts is not None and position is not None:
            found = {int(_INDEX.findall(k)[position]): k for k in keys}
            missing = [e for e in range(experts) if e not in found]
            if missing:
                example = _with_index(keys[0], position, missing[0])
                raise ValueError(
                    f"{where}: expert {missing[0]} of {target.name} is missing (no tensor {example}"
                    f"{'' if len(missing) == 1 else f', and {len(missing) - 1} more experts'}); the checkpoint holds "
                    f"{len(found)} of its {experts} experts: it is incomplete, or config.json's expert count is wrong")
        shapes = {}
        for key in keys:
            shapes.setdefault(tuple(reader.shape(key)), []).append(key)
        if len(shapes) > 1:
            common = max(shapes, key=lambda s: len(shapes[s]))
            odd = next(k for s, ks in shapes.items() if s != common for k in ks)
            expert = (f"expert {_INDEX.findall(odd)[position]} " if position is not None else "")
            raise ValueError(
                f"{reader.file_of(odd)}: {odd} ({expert}of {target.name}) has shape {list(reader.shape(odd))}, the other "
                f"experts have {list(common)}; the checkpoint is damaged or mixes two models")


def _expected_experts(model, name: str) -> Optional[int]:
    from qlora.nn.experts import held_experts

    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    held = held_experts(module, attr)
    if held is not None:
        return held.shape[0]
    tensor = getattr(module, attr, None)
    return tensor.shape[0] if isinstance(tensor, torch.Tensor) and tensor.dim() == 3 else None


def _expert_position(keys: list[str]) -> Optional[int]:
    """Which of the keys' numeric name parts is the expert index: the one that varies (the last one
    when there is a single key)."""
    indices = [_INDEX.findall(k) for k in keys]
    if not indices or not indices[0] or any(len(i) != len(indices[0]) for i in indices):
        return None
    varying = [p for p in range(len(indices[0])) if len({i[p] for i in indices}) > 1]
    return varying[0] if len(varying) == 1 else (len(indices[0]) - 1 if len(keys) == 1 else None)


def _with_index(key: str, position: int, value: int) -> str:
    matches = list(_INDEX.finditer(key))
    m = matches[position]
    return f"{key[:m.start()]}{value}{key[m.end():]}"
