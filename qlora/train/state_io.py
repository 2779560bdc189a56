"""Optimizer, scheduler and RNG state as safetensors + JSON: nothing in a checkpoint is ever unpickled.

torch.save pickles, and unpickling a checkpoint someone shared runs whatever code it carries. A
state dict is a tree of dicts, lists, tuples, numbers, strings, tensors and (in numpy's RNG state)
one ndarray: the tensors go to `<name>.safetensors` under generated keys, the tree to `<name>.json`
with a marker in place of each tensor. Non-string dict keys (optimizer state is keyed by parameter
index) and tuples are marked too, so the tree comes back with the types it had.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_TENSOR, _ARRAY, _TUPLE, _ITEMS, _FLOAT = "__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__"


def _encode(value: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensor = value.detach().to("cpu")
        # safetensors refuses tensors that share memory; state dicts rarely share, so copy when they do.
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        tensors[key] = tensor.clone() if pointer in seen else tensor.contiguous()
        if pointer is not None:
            seen.add(pointer)
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        return {_ARRAY: _encode(torch.from_numpy(value.copy()), tensors, seen)[_TENSOR], "dtype": str(value.dtype)}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors, seen) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, seen) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, seen) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: repr(value)}  # JSON has no inf/nan
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint without pickle: {value!r:.80}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _ARRAY in value:
        return tensors[value[_ARRAY]].numpy().astype(value["dtype"], copy=True)
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
    if _FLOAT in value:
        return float(value[_FLOAT])
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(state: Any, directory: Path, name: str) -> list[Path]:
    """Write `<name>.json` and `<name>.safetensors` into `directory`; returns the files written."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, set())
    json_path, tensor_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    json_path.write_text(json.dumps(tree, allow_nan=False) + "\n")
    save_file(tensors, str(tensor_path))
    return [json_path, tensor_path]


def load_state(directory: Path, name: str) -> Any:
    """The state save_state wrote; reads JSON and safetensors only, so no code can run."""
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)
