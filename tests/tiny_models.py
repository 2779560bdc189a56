"""Tiny random causal LMs of several families, built and saved locally (nothing is downloaded)."""
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, GemmaConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          Phi3Config, Qwen2Config)

VOCAB = 128
# Hidden and intermediate sizes are multiples of 64 so that bitsandbytes' CPU kernels accept them.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)

FAMILIES = {
    "llama": lambda: LlamaConfig(num_key_value_heads=2, **COMMON),
    "mistral": lambda: MistralConfig(num_key_value_heads=2, **COMMON),
    "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **COMMON),
    "gemma": lambda: GemmaConfig(num_key_value_heads=1, head_dim=16, **COMMON),  # tied embeddings
    "phi3": lambda: Phi3Config(num_key_value_heads=4, pad_token_id=0, **COMMON),  # fused qkv / gate_up
    "gpt_neox": lambda: GPTNeoXConfig(**{**COMMON, "intermediate_size": 256}),  # biases everywhere
}


def build_model(family: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).to(dtype)
    model.eval()
    return model


def save_tiny(family: str, directory: Path, dtype=torch.bfloat16, **save_kwargs) -> Path:
    model = build_model(family, dtype=dtype)
    model.save_pretrained(directory, **save_kwargs)
    return directory
