"""Which model class a checkpoint is built as, which of its parts stay 16-bit, and the check that
nothing else does.

- Decoder LMs are built as AutoModelForCausalLM; vision-language models (a config with a
  vision_config whose type AutoModelForImageTextToText knows: Qwen2-VL, Gemma 3, Llava, ...) as
  AutoModelForImageTextToText, whatever AutoModelForCausalLM would make of them (for Qwen2-VL it
  refuses; for Llama 4 it builds the text model only, which the checkpoint's keys do not fit).
- In a vision-language model the language tower (`get_decoder()`) is quantized; everything else
  that is neither the tower nor the output head (vision encoder, multimodal projector) stays 16-bit
  unless asked otherwise: it is small (Qwen2-VL-7B's vision tower is 0.68 B of 8.3 B parameters), it
  sees no gradient in text-only fine-tuning, and its error lands on every image token. The kept modules
  join skip_modules, so config.json's llm_int8_skip_modules carries them and transformers +
  bitsandbytes loads what we save the same way.
- A family is refused, in one line naming it and the parameter, when a weight matrix larger than
  LARGEST_DENSE_MATRIX would stay 16-bit without being asked to (a layer type qlora does not
  quantize), rather than loading a "4-bit" model that is mostly 16-bit. Embeddings, the output head,
  skip_modules and what `keep_dense` registers are exempt.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Callable, Iterator

from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel
# The mappings, not their *_NAMES tables: families registered through AutoModelForCausalLM.register join these.
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from qlora.errors import UnsupportedError

logger = logging.getLogger(__name__)

# A 16-bit floating matrix above this many elements is a weight that should be quantized (or be
# exempt by name). 4096 = a 64x64 matrix: tiny test models' linears are larger, and the dense parts
# that do exist (norms, biases, rotary tables) are vectors.
LARGEST_DENSE_MATRIX = 4096

# Parts that stay 16-bit by design, with the reason; see keep_dense.
_DENSE_BY_DESIGN: list[tuple[Callable[[str, nn.Module], bool], str]] = []


def keep_dense(matches: Callable[[str, nn.Module], bool], reason: str) -> None:
    """Exempt the parameters of modules for which matches(parameter_name, module) is true from the
    coverage check: parts that stay 16-bit by design (say why in `reason`)."""
    _DENSE_BY_DESIGN.append((matches, reason))


# Convolution kernels (Mamba's depthwise conv, patch embeddings) are not matrices of a linear layer;
# bitsandbytes leaves them 16-bit as well.
keep_dense(lambda name, module: isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), "convolution kernel")
# A mixture-of-experts router ([experts, hidden]: Qwen3-30B-A3B's is 128 x 2048, 0.1% of a layer) is
# transformers' own module, not an nn.Linear; it stays 16-bit, where its top-k choice is exact.
keep_dense(lambda name, module: "router" in type(module).__name__.lower(), "mixture-of-experts router")
# A state-space model's decay A_log [channels, state] is an elementwise parameter, not a weight matrix.
keep_dense(lambda name, module: name.rpartition(".")[2] == "A_log", "state-space decay")


def family(config) -> str:
    return getattr(config, "model_type", None) or type(config).__name__


def is_vision_language(config) -> bool:
    return getattr(config, "vision_config", None) is not None and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def auto_class(config):
    """AutoModelForCausalLM or AutoModelForImageTextToText, whichever builds this config's checkpoint."""
    auto_map = getattr(config, "auto_map", None) or {}  # trust_remote_code families name their classes here
    causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or "AutoModelForCausalLM" in auto_map
    if is_vision_language(config) or (not causal and "AutoModelForImageTextToText" in auto_map):
        return AutoModelForImageTextToText
    if causal:
        return AutoModelForCausalLM
    raise UnsupportedError(
        f"{family(config)} ({type(config).__name__}) is neither a causal LM nor an image-text-to-text model "
        "transformers can build; qlora fine-tunes decoder language models (AutoModelForCausalLM) and "
        "vision-language models (AutoModelForImageTextToText)"
    )


def _has_weights(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def vision_modules(model: nn.Module) -> list[str]:
    """The outermost modules of a vision-language model that are neither in its language tower nor
    its output head (vision encoder, multimodal projector); [] for a text model."""
    if not isinstance(model, PreTrainedModel) or not is_vision_language(model.config):
        return []
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or decoder is model:
        return []

    def outside(module: nn.Module, prefix: str) -> Iterator[str]:
        for name, child in module.named_children():
            if child is decoder or child is head or not _has_weights(child):
                continue
            if any(sub is decoder for sub in child.modules()):
                yield from outside(child, f"{prefix}{name}.")
            else:
                yield prefix + name

    return list(outside(model, ""))


def keep_vision_tower(model: nn.Module, qconfig, quantize_vision_tower: bool = False):
    """qconfig with a vision-language model's vision side added to skip_modules (a copy; the same
    qconfig when there is nothing to add or quantize_vision_tower is set)."""
    kept = [] if quantize_vision_tower else [n for n in vision_modules(model) if n not in qconfig.skip_modules]
    if not kept:
        return qconfig
    qconfig = copy.copy(qconfig)
    qconfig.skip_modules = list(qconfig.skip_modules) + kept
    return qconfig


def _skipped(name: str, skip_modules) -> bool:
    # The same rule replace_linear_layers applies.
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip_modules)


def left_dense(model: nn.Module, skip_modules) -> tuple[list[tuple[str, nn.Module, tuple]], Counter]:
    """(parameter name, owning module, shape) of every floating weight matrix above LARGEST_DENSE_MATRIX
    elements that is not quantized, not an embedding, not the output head, not in skip_modules and
    not registered with keep_dense; and how many matrices each keep_dense reason kept."""
    from qlora.nn import QuantizedLinear

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found, by_design = [], Counter()
    for module_name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, nn.Embedding)) or module is head or _skipped(module_name, skip_modules):
            continue
        for attr, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}" if module_name else attr
            if param.dim() < 2 or param.numel() <= LARGEST_DENSE_MATRIX or not param.dtype.is_floating_point:
                continue
            reason = next((why for matches, why in _DENSE_BY_DESIGN if matches(name, module)), None)
            if reason is not None:
                by_design[reason] += 1
            else:
                found.append((name, module, tuple(param.shape)))
    return found, by_design


def check_coverage(model: nn.Module, qconfig) -> None:
    """Refuse, in one line naming the family and the first parameter, a model whose weight matrices
    would stay 16-bit without being asked to; say which stay 16-bit by design."""
    # The vision side of a vision-language model is exempt even when it is quantized on request: what is not a
    # linear layer there (patch convolutions, nn.MultiheadAttention's in_proj_weight) stays 16-bit, as in bitsandbytes.
    dense, by_design = left_dense(model, [*qconfig.skip_modules, *vision_modules(model)])
    if by_design:
        logger.info("kept 16-bit by design: %s", ", ".join(f"{n} x {why}" for why, n in sorted(by_design.items())))
    if not dense:
        return
    name, module, shape = dense[0]
    more = f" (and {len(dense) - 1} more such parameters)" if len(dense) > 1 else ""
    owner = name.rpartition(".")[0] or name
    raise UnsupportedError(
        f"{family(model.config)}: {name} {list(shape)} is a parameter of {type(module).__name__}, a module qlora "
        f"cannot quantize{more}; it would silently stay 16-bit. Keep it 16-bit on purpose with "
        f"skip_modules=[{owner.rpartition('.')[2]!r}], or use a qlora version that supports this family"
    )



def from_pretrained(name_or_path, trust_remote_code: bool = False, revision=None, **kwargs):
    """transformers' dense model of a checkpoint, through the Auto class `auto_class` picks (a merged
    vision-language model is not an AutoModelForCausalLM)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, revision=revision)
    return auto_class(config).from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code,
                                              revision=revision, **kwargs)


def processor_chat_template(directory) -> str | None:
    """The chat template a vision-language checkpoint keeps with its processor (chat_template.json, the
    layout of Llava and older Qwen2-VL repositories), which AutoTokenizer does not read; None without one."""
    import json
    from pathlib import Path

    path = Path(directory) / "chat_template.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None
