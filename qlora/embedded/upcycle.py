"""Sparse-upcycle the embedded base into a small Mixtral (4 experts, top-2), then continue pretraining.

Every layer's dense SwiGLU MLP (intermediate 704) becomes 4 experts of intermediate 576: expert e is
the dense MLP without its e-th slice of 128 hidden neurons, so each neuron lives in 3 of the 4
experts. That breaks the symmetry of plain copies (identical experts give the router nothing to
learn) and keeps the shipped weights under 30 MB in bf16 (full copies: 33 MB). Attention, norms,
embeddings and the head are copied as they are: Mixtral's attention is Llama's. The routers start
small and random; a few minutes of continued pretraining on the same corpus (pretrain.py's loop,
with the router's load-balancing loss) let the experts and routers settle.

    python qlora/embedded/upcycle.py --out qlora/embedded/moe --minutes 6

"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # corpus.py and pretrain.py, when run as a script
import corpus  # noqa: E402
import pretrain  # noqa: E402

BASE = Path(__file__).resolve().parent / "base"


def upcycle(base, experts: int, dropped: int, router_std: float, seed: int):
    """A MixtralForCausalLM whose expert e is `base`'s MLP without hidden neurons [e*dropped, (e+1)*dropped)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = base.config
    kept = c.intermediate_size - dropped
    if experts * dropped > c.intermediate_size:
        raise ValueError(f"{experts} experts x {dropped} dropped neurons exceed the MLP's {c.intermediate_size}")
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=kept,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=False,
        num_local_experts=experts, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.01,
        sliding_window=None, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config)
    source = base.state_dict()
    with torch.no_grad():
        for name, tensor in moe.state_dict().items():
            if name in source:
                tensor.copy_(source[name])
        for i, layer in enumerate(moe.model.layers):
            dense = base.model.layers[i].mlp
            for e in range(experts):
                keep = torch.cat([torch.arange(0, e * dropped), torch.arange((e + 1) * dropped, c.intermediate_size)])
                gate, up = dense.gate_proj.weight[keep], dense.up_proj.weight[keep]
                layer.mlp.experts.gate_up_proj[e].copy_(torch.cat([gate, up]))
                layer.mlp.experts.down_proj[e].copy_(dense.down_proj.weight[:, keep])
            layer.mlp.gate.weight.normal_(0.0, router_std)
    return moe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget of the continued pretraining")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--dropped", type=int, default=128, help="hidden neurons each expert leaves out")
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.repeat_fraction, args.bf16 = 0.0, True  # pretrain()'s options: natural text, bf16 autocast

    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    docs = corpus.documents()
    chunks, n_tokens = pretrain.tokenize_chunks(docs, tokenizer, args.seq_len)
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(args.seed + 1))
    n_val = max(1, int(len(chunks) * args.val_fraction))
    val, train = chunks[perm[:n_val]], chunks[perm[n_val:]]
    base_val = pretrain.evaluate(base, val, args.batch)

    started = time.perf_counter()
    moe = upcycle(base, args.experts, args.dropped, args.router_std, args.seed)
    upcycled_val = pretrain.evaluate(moe, val, args.batch)  # includes the load-balancing term
    n_params = sum(p.numel() for p in moe.parameters())
    log(f"base val loss {base_val:.3f}; upcycled {n_params:,} parameters, val loss {upcycled_val:.3f}")
    result = pretrain.pretrain(moe, train, val, args, log)
    result["tokens_seen"] = result["steps"] * args.batch * args.seq_len
    moe.config.output_router_logits = False
    lm_val = pretrain.evaluate(moe, val, args.batch)  # the language-model loss alone
    moe.config.output_router_logits = True
    log(f"continued pretraining: {result}; language-model val loss {lm_val:.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    moe.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    pretrain.mark_tokenizer_class(args.out)
    record = {
        "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "experts": args.experts, "top_k": 2, "dropped_per_expert": args.dropped, "params": n_params,
        "val_loss": {"dense_base": round(base_val, 4), "upcycled_before_training": round(upcycled_val, 4),
                     "after_training_lm_only": round(lm_val, 4)},
        "train": {"lr": args.lr, "warmup": args.warmup, "batch": args.batch, "seq_len": args.seq_len,
                  "threads": args.threads, "seed": args.seed, "precision": "bf16 autocast, fp32 weights"},
        "result": result, "wall_s_total": round(time.perf_counter() - started, 1),
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__, "python": platform.python_version()},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(args.out, record)
    log(f"saved to {args.out}")


def write_report(out: Path, r: dict) -> None:
    v = r["val_loss"]
    lines = [
        "# Embedded mixture of experts: how it was made", "",
        "The embedded base (`../base`, a 6.9 M-parameter Llama) sparse-upcycled into a MixtralForCausalLM by "
        "`qlora/embedded/upcycle.py`, then pretrained a little longer on the same corpus.", "",
        f"- Command: `{r['command']}`",
        f"- Upcycling: every layer's MLP (intermediate 704) became {r['experts']} experts, top-{r['top_k']} routing; "
        f"expert e is the dense MLP without hidden neurons [{r['dropped_per_expert']}e, {r['dropped_per_expert']}(e+1)) "
        f"(intermediate {704 - r['dropped_per_expert']}), so the experts differ from the start and the weights stay "
        "under 30 MB in bf16; attention, norms, embeddings and head copied; routers random (std 0.02)",
        f"- Parameters: {r['params']:,}",
        f"- Continued pretraining: pretrain.py's loop (AdamW lr {r['train']['lr']}, betas 0.9/0.95, weight decay 0.1, "
        f"{r['train']['warmup']} warmup steps then cosine to 10%), batch {r['train']['batch']} x "
        f"{r['train']['seq_len']} tokens of the base's corpus (natural text only), {r['train']['precision']}, "
        f"{r['train']['threads']} thread(s), seed {r['train']['seed']}; the loss includes Mixtral's load-balancing "
        "loss (router_aux_loss_coef 0.01, output_router_logits true in config.json)",
        f"- Steps: {r['result']['steps']}; tokens seen: {r['result']['tokens_seen']:,}; wall time "
        f"{r['result']['train_wall_s']} s ({r['wall_s_total']} s with upcycling and evaluation)",
        f"- Validation loss (language model only): dense base {v['dense_base']}, after upcycling and training "
        f"{v['after_training_lm_only']} (perplexity {math.exp(v['after_training_lm_only']):.1f}); right after "
        f"upcycling, with the balancing term, {v['upcycled_before_training']}",
        f"- Saved as bfloat16 safetensors with save_pretrained (the Hub's per-expert layout). torch "
        f"{r['env']['torch']}, transformers {r['env']['transformers']}, tokenizers {r['env']['tokenizers']}, "
        f"Python {r['env']['python']}", ""]
    (out / "TRAINING.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
