"""Tiny random mixture-of-experts causal LMs, one per family, written by transformers' own save_pretrained
(per-expert tensors, the Hub's layout). Hidden and expert sizes are multiples of 64 (bitsandbytes' CPU
kernels)."""
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
_ATTENTION = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)

FAMILIES = {
    "qwen3_moe": dict(head_dim=16, intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                      num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=32,
                        q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16),
    "gpt_oss": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    # Llama-4's text model: experts computed by its own bmm module (qlora.nn.bmm_experts), every layer MoE.
    "llama4_text": dict(head_dim=16, intermediate_size=64, intermediate_size_mlp=128, num_local_experts=4,
                        num_experts_per_tok=1, interleave_moe_layer_step=1),
}


def config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**_ATTENTION, **FAMILIES[family], **overrides})


def build_model(family: str, seed: int = 0, dtype=torch.bfloat16, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, **overrides)).to(dtype)
    model.eval()
    return model


def save_tiny_moe(family: str, directory: Path, dtype=torch.bfloat16, **overrides) -> Path:
    build_model(family, dtype=dtype, **overrides).save_pretrained(directory)
    return Path(directory)


def save_tiny_moe_with_tokenizer(directory: Path, family: str = "qwen3_moe", **overrides) -> Path:
    """A tiny MoE with tiny_run's word-level tokenizer (its token ids are the model's vocabulary)."""
    from tiny_run import save_tiny_model_with_tokenizer

    save_tiny_model_with_tokenizer(directory)  # the tokenizer files (and a dense model, replaced below)
    for stale in Path(directory).glob("model*.safetensors*"):
        stale.unlink()
    model = build_model(family, dtype=torch.float32, **overrides)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    model.save_pretrained(directory)
    return Path(directory)
