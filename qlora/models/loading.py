"""load_model: stream a causal LM from safetensors into 4-bit layers, one tensor at a time.

The skeleton is built on the meta device (buffers such as rotary tables stay real), the target
nn.Linear modules are swapped for Linear4bit placeholders, and each checkpoint tensor is read,
moved to the target device and quantized there before the next is read: peak host memory stays
near the quantized model plus one dense tensor.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel

from qlora.errors import UnsupportedError
from qlora.memory import release_freed_memory
from qlora.quant.config import quant_config_from_any
from qlora.quant.gptq.config import read_quantize_config
from qlora.models.checkpoint import ShardReader, resolve_checkpoint
from qlora.models.conv1d import as_out_in, linear_features, mark_source
from qlora.models.conversion import conversion_targets, load_converted
from qlora.models.expert_checkpoint import (dequantized_dense, is_4bit_entry, is_mxfp4_config, load_mxfp4_stack,
                                            load_prequantized_fused, load_prequantized_target)
from qlora.models.families import auto_class, check_coverage, keep_vision_tower
from qlora.nn.experts import held_experts, set_dense_experts
from qlora.nn.experts_interface import replace_expert_parameters
from qlora.nn.quantized import layer_class

logger = logging.getLogger(__name__)


def checkpoint_dtype(config) -> Optional[torch.dtype]:
    """The float dtype config.json records for the checkpoint's weights (`dtype`, formerly
    `torch_dtype`), or None when it records none (or "auto", or a non-float one)."""
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(recorded).removeprefix("torch.") if recorded is not None else ""
    return getattr(torch, name) if name in ("float32", "float16", "bfloat16") else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str | os.PathLike,
    quantization_config=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    attn_implementation: Optional[str] = None,
    device_map=None,
    max_memory: Optional[dict] = None,
    offload_folder: Optional[str | os.PathLike] = None,
    quantize_vision_tower: bool = False,
) -> PreTrainedModel:
    """Load a causal LM (or a vision-language model's language tower) with its linear layers in 4 bits.

    name_or_path: a local checkpoint directory or a Hub repo id.
    quantization_config: qlora.QuantConfig or transformers.BitsAndBytesConfig (default NF4 + DQ,
        bf16 compute). A checkpoint that is already bitsandbytes-quantized loads its packed tensors
        as they are; then only the compute dtype of the given config is used.
    device: where the model goes (default cuda if available, else cpu). "meta" returns the skeleton
        only, nothing read (`model.qlora_unloaded` says what remains): distributed.low_memory_load.
    dtype: dtype of the layers that stay dense (default: the compute dtype).
    attn_implementation: transformers' attention backend ("sdpa", "eager", ...); default: its choice.
    device_map / max_memory / offload_folder: place modules over accelerators, "cpu" and "disk" as
        transformers does (qlora.models.offload); modules on cpu/disk stay fp32 and need
        llm_int8_enable_fp32_cpu_offload=True. `device` then says what an accelerator index means.
    quantize_vision_tower: a vision-language model's vision encoder and projector are quantized too
        (default: kept 16-bit, see qlora.models.families); a pre-quantized checkpoint's own layout wins.
    """
    directory = resolve_checkpoint(name_or_path, revision)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    saved = getattr(config, "quantization_config", None) or read_quantize_config(directory)
    mxfp4 = is_mxfp4_config(saved)
    if mxfp4:  # gpt-oss as published: experts in MXFP4 (held as they are), the rest 16-bit
        saved = None
    prequantized = saved is not None
    if prequantized:
        qconfig = quant_config_from_any(saved.to_dict() if hasattr(saved, "to_dict") else saved)
        if quantization_config is not None:
            qconfig.compute_dtype = quant_config_from_any(quantization_config).compute_dtype
        elif getattr(qconfig, "compute_dtype_from_checkpoint", False):
            qconfig.compute_dtype = checkpoint_dtype(config) or qconfig.compute_dtype
    else:
        qconfig = quant_config_from_any(quantization_config)
    plan = None
    if device_map is not None:
        from qlora.models.offload import plan_offload

        sized = build_skeleton(config, dtype or qconfig.compute_dtype, trust_remote_code, attn_implementation)
        qconfig = _coverage(sized, qconfig, prequantized, quantize_vision_tower)
        replace_linear_layers(sized, qconfig)
        plan = plan_offload(build_skeleton(config, dtype or qconfig.compute_dtype, trust_remote_code), sized,
                            device_map, max_memory, qconfig, None if device is None else torch.device(device))
        qconfig = plan.qconfig_for(qconfig)
        device = torch.device("cpu")  # loaded on the host, then placed by accelerate's dispatch_model
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or qconfig.compute_dtype

    if device.type == "meta":
        # The skeleton only (4-bit placeholders and dense parameters on meta, real rotary buffers):
        # distributed.low_memory_load fills it shard by shard after FSDP2 has sharded it.
        if plan is not None or (not prequantized and getattr(qconfig, "calibrating", False)):
            raise ValueError("device='meta' builds an unloaded skeleton; it cannot be combined with device_map or "
                             "a format that quantizes from calibration activations (GPTQ)")
        model = build_skeleton(config, dtype, trust_remote_code, attn_implementation)
        qconfig = _coverage(model, qconfig, prequantized, quantize_vision_tower)
        targets = replace_linear_layers(model, qconfig)
        stacks = replace_expert_parameters(model, qconfig, lambda name: skipped_by(name, qconfig))
        if stacks and (prequantized or mxfp4):
            kind = "MXFP4" if mxfp4 else "4-bit"
            raise UnsupportedError(f"{name_or_path}: distributed.low_memory_load streams 16-bit expert stacks only, "
                                   f"this checkpoint holds {stacks[0]} already quantized ({kind}); set "
                                   "distributed.low_memory_load=false (each rank then loads it and keeps its shards)")
        check_coverage(model, qconfig)
        with ShardReader(directory) as reader:  # the safetensors headers only
            names = checkpoint_names(model, reader)
            # Per-expert tensors that transformers' conversion mapping merges, by target, named as on this
            # plain skeleton (PEFT renames wrapped modules to <name>.base_layer before they are read).
            converted = conversion_targets(model, reader)
        model.qlora_unloaded = UnloadedCheckpoint(directory, targets, names, prequantized,
                                                  getattr(qconfig, "checkpoint_options", dict)(), converted)
    elif not prequantized and getattr(qconfig, "calibrating", False):
        # A format whose quantizer needs calibration activations (GPTQ) runs the dense model block by block.
        from qlora.models.gptq_calibration import load_and_quantize

        model = load_and_quantize(Path(directory), qconfig, torch.device(device), dtype, trust_remote_code,
                                  attn_implementation, progress)
    else:
        model = build_skeleton(config, dtype, trust_remote_code, attn_implementation)
        if plan is not None:
            plan.keep_offloaded_in_fp32(model)
        qconfig = _coverage(model, qconfig, prequantized, quantize_vision_tower)
        targets = replace_linear_layers(model, qconfig)
        replace_expert_parameters(model, qconfig, lambda name: skipped_by(name, qconfig))
        check_coverage(model, qconfig)
        with ShardReader(directory) as reader:
            _load_tensors(model, reader, targets, device, prequantized, progress,
                          getattr(qconfig, "checkpoint_options", dict)())
    model.config.quantization_config = qconfig.to_hf_dict()
    model.config.name_or_path = str(name_or_path)
    model.qlora_checkpoint_dir = str(directory)  # save_model copies the tokenizer files from here
    model.eval()
    if plan is not None:
        plan.dispatch(model, None if offload_folder is None else str(offload_folder))
    return model


def _coverage(model: PreTrainedModel, qconfig, prequantized: bool, quantize_vision_tower: bool):
    """qconfig with a vision-language model's vision tower kept 16-bit (unless asked, or unless the
    checkpoint is pre-quantized: its own layout, read from its skip_modules, wins)."""
    return qconfig if prequantized else keep_vision_tower(model, qconfig, quantize_vision_tower)


@dataclasses.dataclass
class UnloadedCheckpoint:
    """What a meta skeleton (load_model(device="meta")) still needs read into it."""

    directory: Path
    targets: list[str]  # the quantized layers' names, in the model's order
    names: dict[str, str]  # model tensor name -> checkpoint key (checkpoint_names)
    prequantized: bool
    checkpoint_options: dict
    converted: dict = dataclasses.field(default_factory=dict)  # conversion_targets: model name -> ConvertedTarget


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool, attn_implementation=None) -> PreTrainedModel:
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is plain; quantization is ours to do
    with init_empty_weights(include_buffers=False):
        options = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **options)
    # Built on meta, a tied head (gpt2, gemma) is not tied yet in transformers 5: tie it, so that it is one
    # parameter with the embedding, as the checkpoint (which holds it once) and every reader of the skeleton expect.
    model.tie_weights()
    return model


def _never_quantized(model: PreTrainedModel) -> set[str]:
    """The output head, and any linear tied to another weight, stay dense."""
    head = model.get_output_embeddings()
    names = {name for name, module in model.named_modules() if module is head}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if getattr(model.config, "tie_word_embeddings", False):
        pairs = tied.items() if isinstance(tied, dict) else ((key, "") for key in tied)
        names.update(key.rsplit(".", 1)[0] for pair in pairs for key in pair if key)
    return names


def replace_linear_layers(model: nn.Module, qconfig) -> list[str]:
    """Swap every target nn.Linear (and transformers' Conv1D, qlora.models.conv1d) for a placeholder of
    qconfig's format (the QuantizedLinear subclass registered for it: Linear4bit for NF4/FP4); returns
    the swapped names."""
    layer_cls = layer_class(qconfig.format)
    skip = _never_quantized(model) if isinstance(model, PreTrainedModel) else set()
    swapped = []
    for name, module in list(model.named_modules()):
        features = linear_features(module)
        if features is None or name in skip:
            continue
        if "router" in type(module).__name__.lower():  # an nn.Linear whose forward also routes (Llama-4's router):
            continue  # kept 16-bit like every router (qlora.models.families)
        if skipped_by(name, qconfig):
            continue
        layer = mark_source(layer_cls(*features, bias=module.bias is not None, format=qconfig.format,
                                      compute_dtype=qconfig.compute_dtype, device=module.weight.device,
                                      **qconfig.weight_options()), module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        swapped.append(name)
    return swapped


def skipped_by(name: str, qconfig) -> bool:
    """skip_modules (a name, a name suffix or a parent) and the format's own rule keep `name` 16-bit."""
    if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in qconfig.skip_modules):
        return True
    return not getattr(qconfig, "quantizes", lambda _: True)(name)


def checkpoint_names(model: PreTrainedModel, reader: ShardReader) -> dict[str, str]:
    """Model tensor name -> checkpoint key.

    Checkpoints may spell names the way older transformers did (GPT-NeoX's "embed_out" is now
    "lm_head") or without the base-model prefix; transformers' own conversion mapping and
    prefix rule translate them. Keys that need a tensor conversion (per-expert tensors merged into
    fused MoE stacks, ...) are left out here: qlora.models.conversion streams them.
    """
    try:  # transformers >= 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        get_model_conversion_mapping = None
    expected = {name: True for name, _ in model.named_parameters(remove_duplicate=False)}
    expected.update({name: True for name, _ in model.named_buffers()})
    renamings, converters = [], []
    if get_model_conversion_mapping is not None:
        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", "") or None
    names = {}
    for key in reader.keys():
        if get_model_conversion_mapping is not None:
            name, converter = rename_source_key(key, renamings, converters, prefix, expected)
            if converter is None:
                names.setdefault(name, key)
        elif prefix and key not in expected and f"{prefix}.{key}" in expected:
            names.setdefault(f"{prefix}.{key}", key)
        else:
            names.setdefault(key, key)
    return names


def layer_checkpoint_prefix(reader: ShardReader, names: dict[str, str], module_name: str,
                            data_key: str) -> Optional[str]:
    """The checkpoint prefix of one quantized layer's entries; None when there is no `data_key` entry."""
    key = names.get(f"{module_name}.{data_key}") or names.get(f"{module_name}.weight")
    prefix = key.rpartition(".")[0] + "." if key else None
    if prefix is None or f"{prefix}{data_key}" not in reader:
        # A format whose entries the model has no parameter for (GPTQ's qweight): the same prefix rule.
        candidates = [f"{module_name}.", module_name.partition(".")[2] + "."]
        prefix = next((c for c in candidates if c != "." and f"{c}{data_key}" in reader), None)
    return prefix


def layer_checkpoint_tensors(reader: ShardReader, names: dict[str, str], module_name: str,
                             data_key: str) -> Optional[tuple[str, dict[str, torch.Tensor]]]:
    """(checkpoint prefix, {key relative to it: tensor}) of one quantized layer's entries, its bias
    left out; None when the checkpoint has no entry `data_key` for the layer."""
    prefix = layer_checkpoint_prefix(reader, names, module_name, data_key)
    if prefix is None:
        return None
    # A linear layer has no submodules: every key under its prefix but the bias is the weight's.
    pieces = {k[len(prefix):]: reader.get(k) for k in reader.with_prefix(prefix) if k != prefix + "bias"}
    return prefix, pieces


def _format_label(entries) -> str:
    """What the load bar says the base is loaded as: "nf4", "int8", "gptq", ... (the layers' formats)."""
    formats = sorted({getattr(layer.quantized_weight, "quant_type", None) or type(layer.quantized_weight).format_names[0]
                      for _, layer in entries})
    return "/".join(formats) if formats else "16-bit"


def _load_tensors(model, reader: ShardReader, targets: list[str], device, prequantized: bool, progress: bool,
                  checkpoint_options: Optional[dict] = None):
    names = checkpoint_names(model, reader)
    target_set = set(targets)
    used: set[str] = set()
    missing: list[str] = []
    entries = [(n, m) for n, m in model.named_modules() if n in target_set]
    dense = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)
             if n.rsplit(".", 1)[0] not in target_set or n.endswith(".bias")]
    converted = conversion_targets(model, reader)
    bar = tqdm(total=len(entries) + len(dense), desc=f"loading ({_format_label(entries)})", unit="tensor",
               disable=not progress)
    # Tensors transformers' conversion mapping builds from several checkpoint tensors (per-expert
    # tensors -> fused expert stacks), one target at a time.
    filled: set[str] = set()
    for target in converted.values():
        if prequantized:  # per-expert 4-bit weights go into the stack as they are (qlora.models.expert_checkpoint)
            used.update(load_prequantized_target(model, reader, target, device))
            filled.add(target.name)
            bar.update()
            continue
        placed = load_converted(model, reader, target,
                                lambda n, t, first=None: _place(model, n, t, device, target_set, target, first))
        filled.update(placed)
        used.update(key for _, key in target.sources)
        release_freed_memory()
        bar.update(len(placed))

    for name, layer in entries:
        if f"{name}.weight" in filled:
            continue
        if prequantized:
            pieces = layer_checkpoint_tensors(reader, names, name, type(layer.quantized_weight).data_key)
            if pieces is None:
                missing.append(f"{name}.{type(layer.quantized_weight).data_key}")
                bar.update()
                continue
            prefix, pieces = pieces
            used.update(prefix + k for k in pieces)
            weight_cls = type(layer.quantized_weight)
            layer.hold(weight_cls.from_checkpoint(pieces, device=device, where=prefix + weight_cls.data_key,
                                                  **(checkpoint_options or {})))
            bar.update()
            continue
        key = names.get(f"{name}.weight")
        if key is None:
            missing.append(f"{name}.weight")
            bar.update()
            continue
        used.add(key)
        weight = as_out_in(layer, reader.get(key))  # a Conv1D's [in, out] is transposed here
        _check_shape(key, weight, (layer.out_features, layer.in_features))
        layer.set_weight(weight.to(device))
        del weight
        release_freed_memory()  # the dense tensor and its quantization's scratch, before the next is read
        bar.update()

    for name, param in dense:
        if name in filled:
            continue
        key = names.get(name)
        module_name, _, attr = name.rpartition(".")
        if key is None and reader.has(f"{name}_blocks"):  # MXFP4 experts (gpt-oss), held as they are
            used.update(load_mxfp4_stack(model, reader, name, device))
            bar.update()
            continue
        if prequantized and key is None:  # a fused stack qlora wrote per expert (qlora.models.expert_checkpoint)
            read = load_prequantized_fused(model, reader, name, name, device)
            if read is not None:
                used.update(read)
                bar.update()
                continue
        if key is not None and held_experts(model.get_submodule(module_name), attr) is not None:
            used.add(key)
            _place(model, name, reader.get(key), device, target_set, key)
            bar.update()
            continue
        if key is None:
            if param.is_meta:
                missing.append(name)
            bar.update()
            continue
        used.add(key)
        tensor = reader.get(key)
        if prequantized and param.is_floating_point() and is_4bit_entry(reader, key):
            tensor, state_keys = dequantized_dense(reader, key, param)
            used.update(state_keys)
        _check_shape(key, tensor, tuple(param.shape))
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(tensor.to(device, param.dtype), requires_grad=param.requires_grad)
        bar.update()
    for name, buffer in model.named_buffers():
        key = names.get(name)
        module_name, _, attr = name.rpartition(".")
        # A persistent buffer the checkpoint holds (DeepSeek's router score bias); non-persistent ones
        # (rotary tables some old checkpoints carry, in their storage dtype) are computed, as transformers does.
        if key is not None and key not in used and attr not in model.get_submodule(module_name)._non_persistent_buffers_set:
            used.add(key)
            tensor = reader.get(key)
            _check_shape(key, tensor, tuple(buffer.shape))
            model.get_submodule(module_name)._buffers[attr] = tensor.to(device, buffer.dtype)
    bar.close()

    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(
            f"the checkpoint has no tensor for {', '.join(still_meta[:8])}"
            f"{' and %d more' % (len(still_meta) - 8) if len(still_meta) > 8 else ''}; "
            "it is incomplete or belongs to another architecture"
        )
    for name, buffer in model.named_buffers():
        if buffer.device != device:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = buffer.to(device)
    unexpected = [k for k in reader.keys() if k not in used]
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:5])


def _place(model, name: str, tensor: torch.Tensor, device, quantized_layers: set[str], source,
           first_expert: Optional[int] = None) -> None:
    """Put one dense model tensor where it belongs: into a 4-bit expert stack (all of it, or the experts
    from `first_expert` on) or layer (quantized on `device`), or as a dense parameter. `source` names the
    checkpoint tensor(s) in errors."""
    where = getattr(source, "sources", None)
    where = f"{where[0][1]} (and the rest of {source.name}'s {len(where)} tensors)" if where else str(source)
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if held_experts(module, attr) is not None:
        try:
            set_dense_experts(module, attr, tensor.to(device), first_expert)
        except ValueError as err:
            raise ValueError(f"{where}: {err}; the config and the weights do not match") from None
    elif module_name in quantized_layers and attr == "weight":
        _check_shape(where, tensor, (module.out_features, module.in_features))
        module.set_weight(tensor.to(device))
    else:
        param = module._parameters[attr]
        _check_shape(where, tensor, tuple(param.shape))
        module._parameters[attr] = nn.Parameter(tensor.to(device, param.dtype), requires_grad=param.requires_grad)


def _check_shape(key: str, tensor: torch.Tensor, expected: tuple) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{key}: checkpoint tensor has shape {list(tensor.shape)}, the model built from config.json expects "
            f"{list(expected)}; the config and the weights do not match"
        )
