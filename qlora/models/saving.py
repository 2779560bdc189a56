"""save_model: sharded safetensors + config.json in the transformers + bitsandbytes layout.

Everything is written into a temporary sibling directory and renamed into place at the end, so
an interrupted save never leaves a half-written checkpoint where a complete one is expected.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from qlora.models.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from qlora.models.expert_checkpoint import expert_checkpoint_tensors
from qlora.nn import QuantizedLinear
from qlora.staging import staged_directory

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    """Bytes in "5GB", "500MB", "2GiB" or an int."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    raise ValueError(f"max_shard_size must be bytes or a size like '5GB' or '500MB', got {size!r}")


def save_model(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write `model` (with 4-bit layers) so that transformers + bitsandbytes, and qlora, load it.

    tokenizer: saved alongside when given; otherwise the source checkpoint's tokenizer files are
    copied when the model was loaded from a local directory that has them.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True to replace its contents")
    limit = parse_size(max_shard_size)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not quantized:
        raise ValueError("the model has no qlora quantized layers; load it with qlora.load_model first")
    with staged_directory(output_dir) as staging:
        _write_weights(model, staging, limit)
        _write_config(model, quantized[0], staging)
        _write_tokenizer(model, tokenizer, staging)
    return output_dir


def _unique_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict on CPU, without the second name of tied parameters.

    safetensors refuses tensors that share memory: tied parameters are written once (as
    save_pretrained does), and the code books that all 4-bit layers share are written per layer.
    """
    all_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied_aliases = all_names - {name for name, _ in model.named_parameters()}
    # Quantized expert stacks: bitsandbytes' entries per expert and matrix, under the family's checkpoint names.
    expert_entries, stacks = expert_checkpoint_tensors(model)
    seen: set[int] = set()
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key in tied_aliases or key in stacks:
            continue
        tensor = tensor.detach().to("cpu")
        pointer = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    for key, tensor in expert_entries.items():  # slices of the stacks (safetensors refuses shared storage)
        tensors[key] = tensor.detach().to("cpu").clone()
    return tensors


def _write_weights(model, directory: Path, limit: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in _unique_state_dict(model).items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_config(model, layer: QuantizedLinear, directory: Path) -> None:
    saved = getattr(model.config, "quantization_config", None)
    skip_modules = saved.get("llm_int8_skip_modules") if isinstance(saved, dict) else None
    # The layers' own layout (a checkpoint's wins over the load-time config) describes what is written.
    qconfig = layer.quant_config(skip_modules=skip_modules)
    model.config.quantization_config = qconfig.to_hf_dict()
    model.config.save_pretrained(directory)
    for name, text in getattr(qconfig, "extra_files", dict)().items():  # GPTQ's quantize_config.json
        (directory / name).write_text(text)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)


# A vision-language model's processor files go along: AutoProcessor needs them beside the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def _write_tokenizer(model, tokenizer, directory: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        return
    source = Path(getattr(model, "qlora_checkpoint_dir", None) or getattr(model.config, "name_or_path", "") or "")
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, directory / name)

