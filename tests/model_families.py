"""The table of model families the family battery (test_model_families.py) runs: tiny random
configs, written by transformers' own save_pretrained in the tests.

A row is a Family: a name, a config factory and which Auto class builds it; `dense_modules` names the
module prefixes that stay 16-bit on purpose besides the embeddings and the output head (a
vision-language model's vision tower and projector). Adding a family is adding a row.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

VOCAB = 256
# 2 layers of width 64: every weight matrix is 2048 elements or more (k/v with 2 of 4 heads: 32 x 64),
# the model builds, saves and loads in well under a second.
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT2_LIKE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: Callable[[], object]
    auto: type = AutoModelForCausalLM
    dense_modules: tuple[str, ...] = ()  # prefixes kept 16-bit by design (embeddings and the head always are)

    def __str__(self) -> str:  # the pytest id
        return self.name


def for_model(model_type: str, **overrides) -> Callable[[], object]:
    return lambda: AutoConfig.for_model(model_type, **{**LLAMA_LIKE, **overrides})


def gpt2_like(model_type: str, **overrides) -> Callable[[], object]:
    return lambda: AutoConfig.for_model(model_type, **{**GPT2_LIKE, **overrides})


def _qwen2_vl():
    text = {**LLAMA_LIKE, "model_type": "qwen2_vl_text",
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2)
    return AutoConfig.for_model("qwen2_vl", text_config=text, vision_config=vision, image_token_id=250,
                                video_token_id=251, vision_start_token_id=252)


def _gemma3():
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return AutoConfig.for_model("gemma3", text_config={**LLAMA_LIKE, "model_type": "gemma3_text", "head_dim": 16},
                                vision_config=vision, mm_tokens_per_image=4, image_token_index=250,
                                boi_token_index=251, eoi_token_index=252)


def _llava():
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return AutoConfig.for_model("llava", text_config={**LLAMA_LIKE, "model_type": "llama"}, vision_config=vision,
                                image_token_index=250)


DENSE = [
    Family("llama", for_model("llama")),
    Family("mistral", for_model("mistral")),
    Family("ministral", for_model("ministral", head_dim=16)),
    Family("qwen2", for_model("qwen2")),
    Family("qwen3", for_model("qwen3", head_dim=16)),
    Family("gemma", for_model("gemma", head_dim=16)),  # tied embeddings
    Family("gemma2", for_model("gemma2", head_dim=16)),
    Family("gemma3_text", for_model("gemma3_text", head_dim=16)),
    Family("phi", for_model("phi")),
    Family("phi3", for_model("phi3")),  # fused qkv_proj / gate_up_proj
    Family("gpt2", gpt2_like("gpt2")),  # transformers' Conv1D
    Family("gpt_bigcode", gpt2_like("gpt_bigcode")),  # multi-query attention
    Family("gptj", gpt2_like("gptj", rotary_dim=8)),
    Family("codegen", gpt2_like("codegen", rotary_dim=8)),
    Family("falcon", lambda: AutoConfig.for_model("falcon", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, pad_token_id=0, bos_token_id=1,
                                                  eos_token_id=2)),
    Family("opt", for_model("opt", ffn_dim=128, word_embed_proj_dim=64)),
    Family("gpt_neox", for_model("gpt_neox")),  # biases everywhere
    Family("bloom", lambda: AutoConfig.for_model("bloom", vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    Family("olmo", for_model("olmo")),
    Family("olmo2", for_model("olmo2")),
    Family("olmo3", for_model("olmo3")),
    Family("stablelm", for_model("stablelm")),
    Family("cohere", for_model("cohere")),
    Family("cohere2", for_model("cohere2")),
    Family("starcoder2", for_model("starcoder2")),
    Family("granite", for_model("granite")),
    Family("glm4", for_model("glm4", head_dim=16)),
    Family("smollm3", for_model("smollm3")),
    Family("exaone4", for_model("exaone4")),
    Family("seed_oss", for_model("seed_oss", head_dim=16)),
    Family("nemotron", for_model("nemotron", head_dim=16)),
]

VISION_LANGUAGE = [
    Family("qwen2_vl", _qwen2_vl, AutoModelForImageTextToText, ("model.visual",)),
    Family("gemma3", _gemma3, AutoModelForImageTextToText, ("model.vision_tower", "model.multi_modal_projector")),
    Family("llava", _llava, AutoModelForImageTextToText, ("model.vision_tower", "model.multi_modal_projector")),
]

# Mixture-of-experts families join as rows of their own list.
FAMILIES = DENSE + VISION_LANGUAGE
