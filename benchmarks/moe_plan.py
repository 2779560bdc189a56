"""GPU memory of one-GPU QLoRA on mixture-of-experts models, planned from byte counts measured on
this machine, beside the figures others publish for the same models.

    python benchmarks/moe_plan.py [model=qwen3_30b_a3b|gpt_oss_20b|mixtral_8x7b|all] [seq=2048]
        [micro_batch=1] [lora_r=16] [optim_bits=32] [gpu_memory_gb=24]

Measured at small size (as benchmarks/distributed_plan.py does for dense models, whose measurements
this reuses for the attention and dense parts):
- the bytes per weight of an NF4 + DQ expert stack (qlora's expert weight type), against its bf16 bytes;
- the bytes autograd saves per token in one MoE decoder layer (qlora's 4-bit experts, LoRA on
  attention and experts, bf16), fitted as a x hidden + b x (top-k x expert width) + c x experts
  over four shapes, and the peak its backward allocates per token, fitted the same way.
Three columns: qlora (experts in NF4, LoRA on attention and experts), qlora with
lora.target_experts=false (LoRA on attention only), and the experts left in bf16, which is what
transformers + bitsandbytes does with fused experts (LoRA on attention only: PEFT's `all-linear`
does not reach 3-D parameters). gpt-oss's published MXFP4 experts take 4.25 bits per weight where
the plan counts NF4 + DQ's 4.127 (3% more expert bytes). Writes benchmarks/results/moe_plan.json.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _ROOT]  # kernels/ shadowing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import print_table, versions, write_results  # noqa: E402
from distributed_plan import CUDA_CONTEXT_GB, GB, _LiveBytes, measure_lora_and_optimizer, measure_quantized  # noqa: E402

# Published architectures (each model's config.json). attention: q/k/v/o widths from heads x head_dim.
MODELS = {
    "qwen3_30b_a3b": dict(hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, vocab=151936,
                          experts=128, top_k=8, expert_width=768, shared_width=0, dense_width=0),
    "gpt_oss_20b": dict(hidden=2880, layers=24, heads=64, kv_heads=8, head_dim=64, vocab=201088,
                        experts=32, top_k=4, expert_width=2880, shared_width=0, dense_width=0),
    "mixtral_8x7b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32000,
                         experts=8, top_k=2, expert_width=14336, shared_width=0, dense_width=0),
}
# What others report for one-GPU fine-tuning of the same models (GB of GPU memory). Different setups
# (batch, sequence, rank, kernels): a neighbourhood for the plan, not a like-for-like measurement.
PUBLISHED = {
    "qwen3_30b_a3b": [("Unsloth, QLoRA (experts quantized per expert)", 17.5,
                       "https://github.com/unslothai/unsloth README: 'Qwen3-30B-A3B fits on 17.5GB VRAM'")],
    "gpt_oss_20b": [("Unsloth, QLoRA", 14.0, "https://unsloth.ai/blog/gpt-oss: 'gpt-oss-20b LoRA training fits on a 14GB VRAM'")],
    "mixtral_8x7b": [("transformers + PEFT + bitsandbytes QLoRA (transformers 4.x, experts as nn.Linear)", 32.0,
                      "https://kaitchup.substack.com/p/fine-tune-mixtral-8x7b-quantized: 'even with QLoRA, we still need "
                      "32 GB of GPU memory to fine-tune Mixtral-8x7B'")],
}


def attention_shapes(m: dict) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o."""
    q, kv = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    return [(m["hidden"], q), (m["hidden"], kv), (m["hidden"], kv), (q, m["hidden"])]


def expert_shapes(m: dict) -> list[tuple[int, int]]:
    """(in, out) of one expert's fused gate_up and down projections."""
    return [(m["hidden"], 2 * m["expert_width"]), (m["expert_width"], m["hidden"])]


# ---- measurements at small size ---------------------------------------------------------------

def _tiny_moe(directory: Path, hidden: int, width: int, experts: int, top_k: int):
    """A one-layer Qwen3-MoE written by transformers and loaded by qlora (experts in NF4), with LoRA
    on attention and experts."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import qlora
    from qlora.lora import attach_lora

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=hidden, intermediate_size=4 * width, moe_intermediate_size=width,
                            num_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=hidden // 4, max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(directory)
    model = qlora.load_model(directory, device="cpu", progress=False)
    return attach_lora(model, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                       gradient_checkpointing=False)


def _layer_bytes(model, hidden: int, seq: int = 128) -> tuple[float, float]:
    """(saved bytes per token, peak backward bytes per token) of the model's one decoder layer."""
    base = model.get_base_model().model
    layer = base.layers[0]
    x = torch.randn(1, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    rotary = base.rotary_emb(x, torch.arange(seq)[None])
    seen, saved = set(), 0

    def pack(t):
        nonlocal saved
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen and not isinstance(t, torch.nn.Parameter) and t.numel() >= seq:
            seen.add(key)
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, position_embeddings=rotary, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    live = _LiveBytes()
    with live:
        out.backward(torch.randn_like(out))
    return saved / seq, live.peak / seq


def measure_moe() -> dict:
    """Expert bytes per weight, and per-token bytes of a MoE layer fitted over four shapes."""
    from qlora import QuantConfig

    rows, saved, backward = [], [], []
    shapes = ((64, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 4), (128, 64, 16, 2))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (hidden, width, experts, top_k) in enumerate(shapes):
            model = _tiny_moe(Path(tmp) / str(i), hidden, width, experts, top_k)
            per_token, peak = _layer_bytes(model, hidden)
            rows.append([hidden, top_k * width, experts])
            saved.append(per_token)
            backward.append(peak)
    solve = lambda values: torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),  # noqa: E731
                                             torch.tensor(values, dtype=torch.float64)[:, None]).solution.flatten().tolist()
    expert = expert_bytes_per_weight(QuantConfig())
    return {"saved_per_token": dict(zip(("hidden", "routed_width", "experts"), solve(saved))),
            "backward_per_token": dict(zip(("hidden", "routed_width", "experts"), solve(backward))),
            "expert_bytes_per_weight": expert}


def expert_bytes_per_weight(qconfig) -> float:
    """Bytes per weight of an NF4 + DQ expert stack at a real expert shape (all its state)."""
    from qlora.quant.weight import get_format

    options = {k: v for k, v in qconfig.weight_options().items() if k != "format"}
    # Qwen3-30B-A3B's gate_up stack: 2 x [768, 2048] per expert, each quantized on its own.
    experts = get_format(f"{qconfig.format}-experts").quantize(torch.randn(4, 2 * 768, 2048) * 0.02, segments=2, **options)
    return experts.nbytes / (4 * 2 * 768 * 2048)


# ---- the plan ----------------------------------------------------------------------------------

def plan(m: dict, seq: int, micro_batch: int, r: int, measured: dict, experts_quantized: bool,
         lora_on_experts: bool) -> list[dict]:
    q, lo, moe = measured["quantized"], measured["lora"], measured["moe"]
    attention = attention_shapes(m)
    experts = expert_shapes(m)
    layers, tokens, h, vocab = m["layers"], seq * micro_batch, m["hidden"], m["vocab"]
    attention_weights = layers * sum(i * o for i, o in attention)
    expert_weights = layers * m["experts"] * sum(i * o for i, o in experts)
    per_weight = q["packed_per_weight"] + q["scales_per_weight"]
    expert_bytes = expert_weights * (moe["expert_bytes_per_weight"] if experts_quantized else 2.0)
    router = layers * h * m["experts"] * 2  # bf16: [experts, hidden] per layer is too small to quantize
    dense = (2 * vocab * h + (2 * layers + 1) * h) * 2  # bf16 embeddings, head, norms
    lora_params = layers * r * sum(i + o for i, o in attention)
    if lora_on_experts:  # PEFT's ParamWrapper: r x experts rows of A and columns of B per 3-D parameter
        lora_params += layers * r * m["experts"] * sum(i + o for i, o in experts)
    lora = lora_params * lo["lora_bytes_per_r_in_out"]
    routed = m["top_k"] * m["expert_width"]
    saved, back = moe["saved_per_token"], moe["backward_per_token"]
    per_token_layer = saved["hidden"] * h + saved["routed_width"] * routed + saved["experts"] * m["experts"]
    checkpointed = layers * tokens * h * 2 + tokens * per_token_layer  # layer inputs + one layer's recompute
    backward = tokens * (back["hidden"] * h + back["routed_width"] * routed + back["experts"] * m["experts"])
    logits = tokens * vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy for the loss, its gradient
    rows = [
        ("attention weights (NF4 + DQ)", attention_weights * per_weight),
        ("expert weights (" + ("NF4 + DQ" if experts_quantized else "bf16") + ")", expert_bytes),
        ("routers (bf16)", router),
        ("embeddings, head, norms (bf16)", dense),
        ("LoRA (" + ("attention + experts" if lora_on_experts else "attention") + ")", lora),
        ("optimizer states", lora_params * lo["optimizer_bytes_per_param"]),
        ("gradients", lora_params * lo["grad_bytes_per_param"]),
        ("activations (gradient checkpointing)", checkpointed),
        ("backward of one layer", backward),
        ("logits + loss", logits),
        ("CUDA context (assumed)", CUDA_CONTEXT_GB * GB),
    ]
    return [{"part": name, "GB": value / GB} for name, value in rows]


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    chosen = args.get("model", "all")
    names = list(MODELS) if chosen == "all" else [chosen]
    if any(n not in MODELS for n in names):
        raise SystemExit(f"model={chosen} is not one of {', '.join(MODELS)}, all")
    seq, micro, r = int(args.get("seq", 2048)), int(args.get("micro_batch", 1)), int(args.get("lora_r", 16))
    bits, memory = int(args.get("optim_bits", 32)), float(args.get("gpu_memory_gb", 24))
    measured = {"quantized": measure_quantized(), "lora": measure_lora_and_optimizer(8, bits), "moe": measure_moe()}
    results = {}
    for name in names:
        columns = {"qlora GB": plan(MODELS[name], seq, micro, r, measured, True, True),
                   "qlora, experts not adapted GB": plan(MODELS[name], seq, micro, r, measured, True, False),
                   "experts bf16 GB": plan(MODELS[name], seq, micro, r, measured, False, False)}
        parts = [row["part"] for row in columns["qlora GB"]]
        table = [{"part": part, **{c: f"{rows[i]['GB']:.2f}" for c, rows in columns.items()}} for i, part in enumerate(parts)]
        totals = {c: sum(row["GB"] for row in rows) for c, rows in columns.items()}
        table.append({"part": "total", **{c: f"{t:.1f}" for c, t in totals.items()}})
        print(f"\n{name}: one GPU, seq {seq} x micro-batch {micro}, LoRA r={r}, {bits}-bit AdamW, gradient checkpointing")
        print_table(table, ["part", *columns])
        ours, partial, peer = totals.values()
        print(f"qlora {ours:.1f} GB, {partial:.1f} GB with lora.target_experts=false "
              f"({'fits' if partial <= memory else 'does NOT fit'} {memory:g} GB); experts left bf16 {peer:.1f} GB")
        for who, gb, source in PUBLISHED.get(name, []):
            print(f"published: {who}: {gb:g} GB ({source})")
        results[name] = {"architecture": MODELS[name], "columns": columns, "totals_gb": totals,
                         "published": [dict(zip(("who", "gb", "source"), p)) for p in PUBLISHED.get(name, [])]}
    write_results("moe_plan", {"seq": seq, "micro_batch": micro, "lora_r": r, "optim_bits": bits,
                               "gpu_memory_gb": memory, "measured": measured, "models": results,
                               "versions": versions()})


if __name__ == "__main__":
    main(sys.argv[1:])
