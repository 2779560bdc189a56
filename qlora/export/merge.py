"""Merge a LoRA adapter into a dense copy of its base, streaming one tensor at a time.

The adapter was trained against dequant(NF4(W)), not W: merging into W (or re-quantizing the
merged weight) computes a different function. `base="dequantized"` rebuilds exactly the weights
training saw (quantization is deterministic, so re-quantizing W with the run's QuantConfig gives
the same bytes; a pre-quantized base is dequantized from its packed tensors), and adds PEFT's own
delta to them in fp32. `base="original"` merges into the 16-bit W instead.

Memory: each base tensor is read on its own (ShardReader), merged, cast and handed to a
ShardWriter that writes a shard as soon as it is full; nothing else of the model is held.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig
from transformers.pytorch_utils import Conv1D

from qlora.quant.nf4.config import QuantConfig
from qlora.quant.config import quant_config_from_any
from qlora.errors import DamagedFileError, InputPathError, OptionError, UserError
from qlora.export.experts import (ExpertStackSource, adapter_layout, expert_stack_names, hub_layout, merged_stack,
                                  refuse_prequantized_experts)
from qlora.export.source import AdapterSource
from qlora.export.writer import ShardWriter
from qlora.models.checkpoint import ShardReader, resolve_checkpoint
from qlora.models.conv1d import linear_features
from qlora.models.conversion import conversion_targets
from qlora.models.families import keep_vision_tower
from qlora.models.loading import (build_skeleton, checkpoint_names, layer_checkpoint_tensors, replace_linear_layers,
                                  skipped_by)
from qlora.nn.experts_interface import replace_expert_parameters
from qlora.models.saving import TOKENIZER_FILES, parse_size
from qlora.quant import get_format

BASES = ("dequantized", "original")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": None}
_PEFT_PREFIX = "base_model.model."


class AdapterMismatchError(UserError, ValueError):
    """The adapter was not trained on this base (module names or shapes differ)."""


def parse_dtype_option(dtype: str | torch.dtype | None) -> Optional[torch.dtype]:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype or "auto").removeprefix("torch.")
    if name not in DTYPES:
        raise OptionError(f"dtype={dtype!r} is not supported; use one of {list(DTYPES)} "
                         "(auto keeps each tensor's dtype in the base checkpoint)")
    return DTYPES[name]


def read_adapter(adapter_dir: Path) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
    """The adapter's config and its tensors grouped by module: {module: {lora_A, lora_B, ...}}."""
    config = LoraConfig.from_pretrained(str(adapter_dir))
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputPathError(f"{adapter_dir} has no adapter_model.safetensors; re-save the adapter with "
                                "save_pretrained(safe_serialization=True)")
    parts = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "B_bias", "lora_magnitude_vector": "magnitude",
             "lora_magnitude_vector.weight": "magnitude"}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights)).items():
        name = key.removeprefix(_PEFT_PREFIX)
        for suffix, part in parts.items():
            if name.endswith("." + suffix):
                modules.setdefault(name[: -len(suffix) - 1], {})[part] = tensor
                break
        else:
            raise NotImplementedError(
                f"adapter tensor {key!r} is not a LoRA A/B/magnitude weight of a linear layer (modules_to_save, "
                "trainable biases and embedding adapters are not merged by qlora); train without them to export"
            )
    for module, part in modules.items():
        if "A" not in part or "B" not in part:
            raise DamagedFileError(f"{weights}: module {module} has lora_A or lora_B but not both; the file is damaged")
    return config, modules


def _peft_merged_weight(weight: torch.Tensor, bias: Optional[torch.Tensor], parts: dict, config: LoraConfig,
                        module: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """W + delta (and b + delta_b) as PEFT's own LoRA layer merges them, in fp32.

    A one-layer PEFT lora.Linear is built around the weight and its merge() is called, so the
    scaling (alpha/r, alpha/sqrt(r) with rsLoRA, rank/alpha patterns) and DoRA's magnitude
    rescaling are PEFT's code, not a copy of it.
    """
    r = parts["A"].shape[0]
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=False)
    layer_config = copy.copy(config)
    layer_config.lora_dropout = 0.0
    layer_config.init_lora_weights = False  # overwritten below; skip PEFT's random init
    layer = PeftLoraLinear(linear, "default", config=layer_config, r=r, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(parts["A"].float())
        layer.lora_B["default"].weight.copy_(parts["B"].float())
        if "B_bias" in parts:
            layer.lora_B["default"].bias.copy_(parts["B_bias"].float())
        if "magnitude" in parts:
            layer.lora_magnitude_vector["default"].weight.copy_(parts["magnitude"].float().reshape(-1))
    layer.merge(adapter_names=["default"])
    merged = layer.get_base_layer()
    return merged.weight.detach(), None if bias is None else merged.bias.detach()


def _check_adapter_matches(skeleton: nn.Module, modules: dict, base_name: str, adapter_dir: Path) -> None:
    available = dict(skeleton.named_modules())
    for module, parts in modules.items():
        layer = available.get(module)
        features = None if layer is None else linear_features(layer) or (
            (layer.in_features, layer.out_features) if hasattr(layer, "in_features") else None)
        if features is None:
            raise AdapterMismatchError(
                f"the adapter in {adapter_dir} adapts {module!r}, which is not a linear layer of the base "
                f"{base_name}; the adapter was trained on another model: pass the run's own base checkpoint")
        in_features, out_features = features
        expected_a, expected_b = (parts["A"].shape[0], in_features), (out_features, parts["A"].shape[0])
        if tuple(parts["A"].shape) != expected_a or tuple(parts["B"].shape) != expected_b:
            raise AdapterMismatchError(
                f"adapter module {module!r} has lora_A {list(parts['A'].shape)} and lora_B {list(parts['B'].shape)}, "
                f"but the base {base_name} has a [{out_features}, {in_features}] weight there; the adapter "
                "was trained on another model: pass the run's own base checkpoint")


def merge_to_hf_dir(source: AdapterSource, directory: Path, base: str = "dequantized", original: Optional[str] = None,
                    dtype: str = "bfloat16", max_shard_size: int | str = "5GB", progress: bool = True) -> dict:
    """Write the merged model (weights, config, generation config, tokenizer) into `directory`.

    Returns the record of what was merged into what (also stored in config.json as `qlora_merge`).
    """
    if base not in BASES:
        raise OptionError(f"base={base!r} is not one of {list(BASES)}: 'dequantized' merges into dequant(NF4(W)) as "
                         "training saw it, 'original' into the 16-bit weights")
    out_dtype = parse_dtype_option(dtype)
    base_dir = resolve_checkpoint(source.base, source.revision)
    base_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=source.trust_remote_code)
    saved_q = getattr(base_config, "quantization_config", None)
    prequantized = saved_q is not None
    if base == "original":
        if original is None and prequantized:
            raise OptionError(f"base='original' needs the 16-bit weights, but the base {source.base} is pre-quantized "
                             "(its config.json has a quantization_config); pass original=<path to the 16-bit "
                             "checkpoint>, or use base='dequantized'")
        weights_dir = resolve_checkpoint(original) if original is not None else base_dir
        if getattr(AutoConfig.from_pretrained(weights_dir, trust_remote_code=source.trust_remote_code),
                   "quantization_config", None) is not None:
            raise OptionError(f"original={original!r} is itself a 4-bit checkpoint; pass the 16-bit one")
    else:
        if original is not None:
            raise OptionError("original=<path> applies to base='original' only; drop it or set base='original'")
        weights_dir = base_dir
    qconfig = quant_config_from_any(saved_q.to_dict() if hasattr(saved_q, "to_dict") else saved_q) \
        if prequantized else source.qconfig
    # A run on the unquantized base (quantization=none) trained against W itself: there is nothing to dequantize.
    dequantize_base = base == "dequantized" and source.quantized
    read_packed = dequantize_base and prequantized

    lora_config, modules = read_adapter(source.adapter_dir)
    if lora_config.use_dora and lora_config.lora_bias:
        raise NotImplementedError("DoRA adapters with lora_bias=True are not supported by the merge")
    skeleton = build_skeleton(base_config, torch.float32, source.trust_remote_code)
    if read_packed:
        refuse_prequantized_experts(skeleton, source.base)
    # LoRA on expert stacks (PEFT's ParamWrapper keys) is taken out of `modules`, which keeps the linears.
    expert_adapters = adapter_layout(skeleton, lora_config, modules)
    _check_adapter_matches(skeleton, modules, source.base, source.adapter_dir)
    for adapter in expert_adapters.values():
        if not adapter.fits():
            raise AdapterMismatchError(
                f"adapter module {adapter.module!r} ({adapter.stack}) has lora_A {list(adapter.lora_a.shape)} and "
                f"lora_B {list(adapter.lora_b.shape)}, the base's expert stack needs {list(adapter.expected_a)} and "
                f"{list(adapter.expected_b)}; the adapter was trained on another model: pass the run's own base "
                "checkpoint")
    tied = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)} - {n for n, _ in skeleton.named_parameters()}
    output_names = [n for n in skeleton.state_dict() if n not in tied]
    # transformers' Conv1D (GPT-2) stores [in, out]: merged as [out, in], written back as it was read.
    transposed = {n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)}
    # Which linears and expert stacks training held in 4 bits: the rules load_model applies (head and
    # skip_modules stay dense).
    if not prequantized:  # a vision-language model's vision side, as load_model kept it (16-bit by default)
        qconfig = keep_vision_tower(skeleton, qconfig, source.quantize_vision_tower)
    quantized = set(replace_linear_layers(skeleton, qconfig)) if dequantize_base else set()
    if dequantize_base:
        quantized.update(replace_expert_parameters(skeleton, qconfig, lambda name: skipped_by(name, qconfig)))
    stacks = expert_stack_names(skeleton)

    record = {
        "base": base, "base_model": str(source.base), "weights_from": str(weights_dir), "adapter": str(source.adapter_dir),
        # How training quantized the base (used to rebuild it for base="dequantized", and by format="nf4").
        "base_prequantized": prequantized, "quantization": _qconfig_record(qconfig),
        "quantization_from": "base checkpoint" if prequantized else "run config.yaml" if source.qconfig_known
                             else "defaults (no run config found)",
        "lora": {"r": lora_config.r, "alpha": lora_config.lora_alpha, "use_rslora": lora_config.use_rslora,
                 "use_dora": lora_config.use_dora},
        "merged_modules": len(modules) + len(expert_adapters), "merged_expert_stacks": len(expert_adapters),
        "merge_dtype": "float32", "trained_on_quantized_base": source.quantized,
        "dtype": "auto" if out_dtype is None else str(out_dtype).removeprefix("torch."),
    }
    writer = ShardWriter(directory, parse_size(max_shard_size))
    with ShardReader(weights_dir) as reader:
        names = checkpoint_names(skeleton, reader)
        stack_source = ExpertStackSource(skeleton, reader, names, conversion_targets(skeleton, reader)) \
            if stacks else None
        bar = tqdm(total=len(output_names), desc="merging", unit="tensor", disable=not progress)
        for name in output_names:
            if name in stacks:  # one layer's expert stack, written per expert as the Hub holds it
                merged = stack_source.merged(name, lambda stack, dense, first: merged_stack(
                    *stacks[stack], dense, expert_adapters.get(stack), stack in quantized, out_dtype, first))
                for key, tensor in hub_layout(skeleton, {name: merged}):
                    writer.add(key, tensor)
                del merged
                bar.update()
                continue
            key = names.get(name)
            packed_layer = read_packed and name.endswith(".weight") and name.rpartition(".")[0] in quantized
            if key is None and not packed_layer:
                if name in dict(skeleton.named_parameters()):
                    raise DamagedFileError(f"the base checkpoint {weights_dir} has no tensor for {name}; it is incomplete "
                                     "or belongs to another architecture")
                bar.update()
                continue  # a persistent buffer the checkpoint does not carry: from_pretrained rebuilds it
            # One function call per tensor: its locals (the dense read, the fp32 copy) die on return.
            tensor = _merged_tensor(name, key, reader, names, modules, quantized, qconfig, read_packed, lora_config,
                                    out_dtype, transposed)
            for out_name, out_tensor in (hub_layout(skeleton, {name: tensor}) if stacks else ((name, tensor),)):
                writer.add(out_name, out_tensor)
            bar.update()
        bar.close()
    writer.close()
    record["peak_shard_bytes"] = writer.peak_pending_bytes
    _write_config(base_config, directory, out_dtype, record)
    _copy_side_files(source, base_dir, directory, base_config)
    return record


def _merged_tensor(name, key, reader, names, modules, quantized, qconfig, read_packed, lora_config, out_dtype,
                   transposed=frozenset()) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    flip = attr == "weight" and module in transposed  # a Conv1D's [in, out] weight
    weight_cls = get_format(qconfig.format)
    if read_packed and module in quantized and attr == "weight":
        # A pre-quantized base: decode the layer's own entries, in the format's checkpoint form.
        found = layer_checkpoint_tensors(reader, names, module, weight_cls.data_key)
        if found is None:
            raise ValueError(f"the base checkpoint has no {weight_cls.data_key!r} entry for {module}; it is incomplete")
        prefix, pieces = found
        weight = weight_cls.from_checkpoint(pieces, where=prefix + weight_cls.data_key,
                                            **getattr(qconfig, "checkpoint_options", dict)())
        source_dtype = weight.dtype
        tensor = weight.dequantize(torch.float32)
    else:
        tensor = reader.get(key)
        source_dtype = tensor.dtype
        tensor = tensor.t().contiguous() if flip else tensor
        if module in quantized and attr == "weight":
            if not getattr(qconfig, "requantizable", True):
                raise ValueError(f"{qconfig.format} quantization depends on calibration data and cannot be rebuilt from "
                                 f"the 16-bit {name}; export from the quantized checkpoint the run trained on "
                                 "(pass it as the base)")
            # Bit-exact with what load_model built for training, then decoded in fp32.
            tensor = weight_cls.quantize(tensor, **qconfig.weight_options()).dequantize(torch.float32)
    parts = modules.get(module)
    if parts is not None and attr == "weight":
        tensor, _ = _peft_merged_weight(tensor.float(), None, parts, lora_config, module)
    elif parts is not None and attr == "bias" and "B_bias" in parts:
        # lora_bias=True: PEFT's merge adds lora_B.bias * scaling to the base bias.
        weight_shape = (parts["B"].shape[0], parts["A"].shape[1])
        _, tensor = _peft_merged_weight(torch.zeros(weight_shape), tensor.float(), parts, lora_config, module)
    return (tensor.t().contiguous() if flip else tensor).to(out_dtype or source_dtype)


def _qconfig_record(qconfig) -> dict:
    record = {"format": qconfig.format, "skip_modules": list(qconfig.skip_modules),
              "quantization_config": qconfig.to_hf_dict()}
    if isinstance(qconfig, QuantConfig):  # the 4-bit fields by name, as format="nf4" re-quantizes with them
        record.update(quant_type=qconfig.quant_type, double_quant=qconfig.double_quant, blocksize=qconfig.blocksize)
    return record


def _write_config(base_config, directory: Path, out_dtype, record: dict) -> None:
    config = copy.deepcopy(base_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the merged model is plain dense weights
    if out_dtype is not None:
        config.dtype = out_dtype
    config.qlora_merge = record
    config.save_pretrained(directory)


def _copy_side_files(source: AdapterSource, base_dir: Path, directory: Path, base_config) -> None:
    """Tokenizer (the run's own copy in the adapter dir first: it may set a pad token) and generation config."""
    tokenizer_dir = source.adapter_dir if (source.adapter_dir / "tokenizer_config.json").is_file() else base_dir
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, directory / name)
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", directory / "generation_config.json")
    else:
        GenerationConfig.from_model_config(base_config).save_pretrained(directory)


def read_merge_record(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text()).get("qlora_merge", {})
