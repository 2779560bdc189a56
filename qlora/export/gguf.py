"""Convert a merged Hugging Face checkpoint to a GGUF file for llama.cpp.

`write_gguf(merged_dir, out_path, gguf_type)` reads what `save_pretrained` writes (config.json,
one or more dense safetensors files, tokenizer.json / tokenizer_config.json) and writes one GGUF
file laid out as llama.cpp's convert_hf_to_gguf.py lays it out for the same model: the same
metadata keys, tensor names, q/k permutation and per-tensor types. The code is our own; only the
`gguf` package (llama.cpp's Python library) is used for constants, the file writer and Q8_0.

Supported: model_type llama and mistral (both GGUF architecture "llama", as convert_hf_to_gguf
maps MistralForCausalLM to LlamaModel) and qwen2 (architecture "qwen2"); mixture of experts: mixtral
(architecture "llama" with experts) and qwen3_moe ("qwen3moe"), whose per-expert tensors are stacked
into blk.N.ffn_{gate,up,down}_exps [E, out, in] with expert_count / expert_used_count in the metadata.
Other families (MoE or not) are refused with one line naming them. Tokenizers: byte-level BPE only
(tokenizer.ggml.model "gpt2"), see `_add_tokenizer`.

Tensors are streamed: the header is written from the safetensors shapes alone, then each tensor is
read, converted and written before the next one is read, so peak memory is about one tensor (for
experts, one layer's stack of one projection).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import torch
from safetensors import safe_open

from qlora.errors import OptionError

logger = logging.getLogger(__name__)

# model_type -> GGUF architecture, and whether q/k need llama.cpp's rotary permutation.
# llama.cpp runs "llama" with interleaved (GPT-J style) rope pairs, while HF checkpoints store q/k
# rows in rotate_half order (HF's own conversion from Meta weights un-permuted them), so
# convert_hf_to_gguf re-permutes them for LlamaModel. Qwen2 runs NEOX rope in llama.cpp, which
# matches HF's order, so its weights are written as they are.
_ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}
# Mixture-of-experts families llama.cpp converts, as convert_hf_to_gguf does: Mixtral is its LlamaModel
# (architecture "llama", q/k permuted) with experts, Qwen3-MoE its Qwen3MoeModel (NEOX rope, no permutation).
# Per-expert tensors (experts.{e}.gate_proj / Mixtral's w1, w2, w3) are stacked into one [E, out, in]
# tensor per layer and projection: blk.N.ffn_gate_exps / ffn_up_exps / ffn_down_exps; the router is
# blk.N.ffn_gate_inp, kept F32 like convert_hf_to_gguf keeps it.
_MOE_ARCHITECTURES = {
    "mixtral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen3_moe": (gguf.MODEL_ARCH.QWEN3MOE, False),
}
# config.json keys that say a model is a mixture of experts (convert_hf_to_gguf's expert_count keys).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_EXPERT_USED_KEYS = ("num_experts_per_tok", "num_experts_per_token")
_EXPERT_TENSOR = re.compile(r"^(?P<stack>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")

_FILE_TYPES = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}

# Known byte-level pre-tokenizer regexes -> llama.cpp's tokenizer.ggml.pre name. llama.cpp picks
# its pre-tokenizer by this name, not by the regex, so an unknown regex gets "default" (a warning).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def write_gguf(merged_dir: Path, out_path: Path, gguf_type: str = "f16", name: Optional[str] = None) -> Path:
    """Write the checkpoint in `merged_dir` to `out_path` as GGUF; returns `out_path`.

    name: the model's `general.name` (default: the name of `merged_dir`).
    gguf_type: "f16" or "bf16" (2-D weights in that type) or "q8_0" (2-D weights Q8_0-quantized;
    a matrix whose rows are not a multiple of 32 falls back to F16 as in convert_hf_to_gguf).
    1-D tensors (norms, biases) are always F32. The file appears atomically: it is written to a
    temporary name next to `out_path` and renamed.
    """
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    if gguf_type not in _FILE_TYPES:
        raise OptionError(f"gguf_type must be one of {sorted(_FILE_TYPES)}, got {gguf_type!r}")
    config = _read_config(merged_dir)
    model_type = config.get("model_type")
    if model_type not in _ARCHITECTURES and model_type not in _MOE_ARCHITECTURES:
        family = "the mixture-of-experts family" if _expert_count(config) else "model_type"
        raise OptionError(f"GGUF export does not support {family} {model_type!r}; supported: "
                          f"{', '.join(sorted(_ARCHITECTURES))}; mixture of experts: "
                          f"{', '.join(sorted(_MOE_ARCHITECTURES))} (export format=hf and convert it with llama.cpp's "
                          "convert_hf_to_gguf.py if it knows the family)")
    arch, permute_qk = {**_ARCHITECTURES, **_MOE_ARCHITECTURES}[model_type]
    file_type, weight_qtype = _FILE_TYPES[gguf_type]
    weight_files = _weight_files(merged_dir)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp_path, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_hparams(writer, config, file_type, name or merged_dir.name)
        _add_tokenizer(writer, merged_dir, config["vocab_size"])
        plan = _plan_tensors(writer, config, arch, weight_files, weight_qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # write_tensor_data takes tensors in the order their infos were added.
        for gguf_name, source, qtype in plan:
            if isinstance(source, ExpertStack):
                data = source.load()
            else:
                data = _load_tensor(source, config, permute_qk) if isinstance(source, tuple) else source
            writer.write_tensor_data(_convert(data, qtype))
        writer.close()
        os.replace(tmp_path, out_path)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    return out_path


def _read_config(merged_dir: Path) -> dict:
    config_file = merged_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {merged_dir}: expected a save_pretrained directory")
    config = json.loads(config_file.read_text())
    # Multimodal wrappers keep the language model's settings under text_config; not supported here.
    if "vocab_size" not in config or "num_hidden_layers" not in config:
        raise ValueError(f"{config_file} lacks vocab_size/num_hidden_layers; is it a causal LM config?")
    return config


def _weight_files(merged_dir: Path) -> list[Path]:
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [merged_dir / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(merged_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {merged_dir} (a .bin checkpoint must be "
                                "re-saved with safe_serialization)")
    return files


def _rope_parameters(config: dict) -> dict:
    # transformers 5 writes rope_parameters (with rope_theta inside); older configs write
    # rope_theta at the top level and rope_scaling separately.
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hparams(writer: gguf.GGUFWriter, config: dict, file_type: gguf.LlamaFileType, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise ValueError(f"GGUF export does not support rope_type {rope['rope_type']!r} "
                         "(supported: default, linear, llama3)")
    experts = _expert_count(config)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(next(config[k] for k in _EXPERT_USED_KEYS if k in config))
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _expert_count(config: dict) -> Optional[int]:
    return next((config[k] for k in _EXPERT_COUNT_KEYS if config.get(k)), None)


def _add_tokenizer(writer: gguf.GGUFWriter, merged_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE as tokenizer.ggml.model "gpt2", as convert_hf_to_gguf's _set_vocab_gpt2.

    Any other tokenizer (WordLevel, Unigram, SentencePiece-style BPE with byte fallback) raises:
    writing its tokens under "gpt2" would give a file llama.cpp loads but tokenizes wrongly, which is
    worse than no file. SentencePiece models need the tokenizer.model scores, which merged
    checkpoints saved by transformers 5 do not carry.
    """
    tokenizer_file = merged_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {merged_dir}: GGUF needs the tokenizer "
                                "(save it next to the model with tokenizer.save_pretrained)")
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tokenizer["model"]
    pre_tokenizers = _flatten(tokenizer.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pre_tokenizers):
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers only; {tokenizer_file} has "
                         f"model {model.get('type')!r} with pre-tokenizers "
                         f"{[p.get('type') for p in pre_tokenizers]}")

    id_to_token = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
    for token_id, entry in added.items():
        id_to_token[token_id] = entry["content"]
    if max(id_to_token) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(id_to_token)} but the model's vocab_size is {vocab_size}")
    tokens, token_types = [], []
    # llama.cpp needs exactly one token per embedding row; rows no token uses (vocab padded to a
    # multiple of 64, say) get placeholders, as convert_hf_to_gguf writes them.
    for token_id in range(vocab_size):
        if token_id not in id_to_token:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(id_to_token[token_id])
            token_types.append(gguf.TokenType.CONTROL if added[token_id].get("special")
                               else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(id_to_token[token_id])
            token_types.append(gguf.TokenType.NORMAL)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(pre_tokenizers))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    # SpecialVocab is the gguf package's reader of merges, bos/eos/unk/pad ids, add_bos/add_eos
    # and the chat template (tokenizer_config.json or chat_template.jinja); convert_hf_to_gguf
    # uses it the same way.
    gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _flatten(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [p for child in pre_tokenizer["pretokenizers"] for p in _flatten(child)]
    return [pre_tokenizer]


def _pre_tokenizer_name(pre_tokenizers: list[dict]) -> str:
    splits = [p["pattern"].get("Regex") for p in pre_tokenizers if p.get("type") == "Split"]
    if not splits:
        byte_level = next(p for p in pre_tokenizers if p.get("type") == "ByteLevel")
        if byte_level.get("use_regex", True):
            return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    elif len(splits) == 1 and splits[0] in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[splits[0]]
    logger.warning("unknown pre-tokenizer %s; writing tokenizer.ggml.pre 'default', llama.cpp may split "
                   "text differently from the HF tokenizer", pre_tokenizers)
    return "default"


def _plan_tensors(writer, config, arch, weight_files, weight_qtype):
    """Declare every tensor (name, shape, type, size) from the safetensors headers alone.

    Returns [(gguf_name, (file, key) or an in-memory array, qtype)] in writing order.
    """
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    plan = []
    rope_freqs = _llama3_rope_factors(config)
    if rope_freqs is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs,
                     gguf.GGMLQuantizationType.F32, rope_freqs.shape))
    stacks: dict[str, ExpertStack] = {}
    for path in weight_files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp from the hparams
                    continue
                expert = _EXPERT_TENSOR.match(key) if _expert_count(config) else None
                if expert is not None:  # one [E, out, in] tensor per layer and projection, placed at its first expert
                    stack_key = f"{expert['stack']}.{expert['proj']}.weight"
                    if stack_key not in stacks:
                        gguf_name = name_map.get_name(stack_key, try_suffixes=(".weight",))
                        if gguf_name is None:
                            raise ValueError(f"cannot map expert tensor {key!r} in {path.name} to a GGUF name")
                        stacks[stack_key] = ExpertStack(stack_key, _expert_count(config))
                        plan.append((gguf_name, stacks[stack_key], None, None))
                    stacks[stack_key].add(int(expert["expert"]), path, key, list(f.get_slice(key).get_shape()))
                    continue
                gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ValueError(f"cannot map tensor {key!r} in {path.name} to a GGUF name")
                shape = list(f.get_slice(key).get_shape())
                plan.append((gguf_name, (path, key), _tensor_qtype(gguf_name, shape, weight_qtype), shape))
    for i, (gguf_name, source, qtype, shape) in enumerate(plan):
        if isinstance(source, ExpertStack):
            shape = source.shape()
            plan[i] = (gguf_name, source, _tensor_qtype(gguf_name, shape, weight_qtype), shape)
    for gguf_name, _, qtype, shape in plan:
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    return [(gguf_name, source, qtype) for gguf_name, source, qtype, _ in plan]


def _tensor_qtype(gguf_name: str, shape, weight_qtype):
    # As convert_hf_to_gguf: 1-D tensors and norms stay F32; Q8_0 needs rows divisible by its
    # 32-element block, and convert_hf_to_gguf falls back to F16 for the rest.
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or _ROUTER.match(gguf_name):
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[weight_qtype]
    if shape[-1] % block_size:
        return gguf.GGMLQuantizationType.F16
    return weight_qtype


# The MoE router: always F32 in convert_hf_to_gguf (and in llama.cpp's quantizer).
_ROUTER = re.compile(r"^blk\.\d+\.ffn_gate_inp\.weight$")


class ExpertStack:
    """The per-expert tensors of one layer's projection, stacked [E, out, in] when written (one layer's
    projection in fp32 at a time: 128 experts of 768x2048 are 0.8 GB)."""

    def __init__(self, name: str, num_experts: int):
        self.name, self.num_experts = name, num_experts
        self.sources: dict[int, tuple[Path, str, list[int]]] = {}

    def add(self, expert: int, path: Path, key: str, shape: list[int]) -> None:
        self.sources[expert] = (path, key, shape)

    def shape(self) -> list[int]:
        missing = [e for e in range(self.num_experts) if e not in self.sources]
        if missing or len(self.sources) != self.num_experts:
            example = self.name.replace(".weight", "").rpartition(".")
            raise ValueError(f"the checkpoint has {len(self.sources)} experts for {self.name}, config.json says "
                             f"{self.num_experts}: no tensor {example[0]}.{missing[0] if missing else '?'}.{example[2]}"
                             ".weight; the checkpoint is incomplete")
        shapes = {tuple(s) for _, _, s in self.sources.values()}
        if len(shapes) != 1:
            odd = next(k for _, k, s in self.sources.values() if tuple(s) != tuple(self.sources[0][2]))
            raise ValueError(f"expert tensor {odd} has another shape than expert 0 of {self.name} "
                             f"({list(self.sources[0][2])}); the checkpoint is damaged")
        return [self.num_experts, *self.sources[0][2]]

    def load(self) -> np.ndarray:
        stacked = np.empty(self.shape(), dtype=np.float32)
        for e in range(self.num_experts):
            path, key, _ = self.sources[e]
            with safe_open(path, framework="pt") as f:
                stacked[e] = f.get_tensor(key).to(torch.float32).numpy()
        return stacked


def _nbytes(shape, qtype) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def _load_tensor(source: tuple[Path, str], config: dict, permute_qk: bool) -> np.ndarray:
    path, key = source
    with safe_open(path, framework="pt") as f:
        # Through float32 because numpy has no bfloat16; every bf16/f16 value is exact in f32.
        data = f.get_tensor(key).to(torch.float32).numpy()
    if permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
        data = permute_for_llama_rope(data, config["num_attention_heads"])
    elif permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
        data = permute_for_llama_rope(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    return data


def permute_for_llama_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: within each head, reorder rows from HF's rotate_half
    layout (all first halves, then all second halves) to interleaved pairs (0, d/2, 1, d/2+1, ...).
    For k, n_head is the number of kv heads."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _convert(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Llama 3.1+ rope scaling, which llama.cpp reads as per-frequency factors in a rope_freqs
    tensor (the same formula as convert_hf_to_gguf's LlamaModel.generate_extra_tensors)."""
    rope = _rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
