"""End-to-end QLoRA training on CPU: qlora against transformers + PEFT + bitsandbytes' CPU backend,
same model, data, LoRA and steps. Writes benchmarks/results/train_cpu.json.

    python benchmarks/train_cpu.py [--layers 24] [--hidden 1024] [--intermediate 4096] [--seq 512]
                                   [--steps 4] [--threads 2] [--rounds 1]

Model: a Llama of random weights (seeded), ~0.5 B parameters at the defaults (24 layers, hidden 1024,
MLP 4096, 16 heads, vocab 32000), written once as a bf16 checkpoint that both sides load in NF4 +
double quant (blocksize 64), computing in bf16. LoRA r=16, alpha 32 on every linear layer but the
head, gradient checkpointing (non-reentrant) on both, AdamW lr 1e-4 on the adapters. Data: random
token ids, one sequence of `seq` tokens per step, the same on both sides. Each side runs in a fresh
process (its peak resident set, VmHWM, is its own); `rounds` alternates them. tokens/s counts the
steps after the first (which builds caches and the C kernels' library).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _ROOT]  # kernels/ shadowing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, peak_rss, print_table, versions, write_results  # noqa: E402

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_model(directory: Path, args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         vocab_size=32000, max_position_embeddings=max(args.seq, 512), tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def train(side: str, directory: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if side == "qlora":
        import qlora
        from qlora.lora import attach_lora
        from qlora.quant.nf4.config import QuantConfig

        model = qlora.load_model(directory, QuantConfig(quant_type="nf4", double_quant=True, compute_dtype="bfloat16"),
                                 device="cpu", dtype=torch.bfloat16, progress=False)
        model = attach_lora(model, target_modules=TARGETS, gradient_checkpointing=True, **LORA)
    else:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map="cpu")
        for param in model.parameters():
            param.requires_grad_(False)
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(target_modules=TARGETS, **LORA))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    losses, times = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, 32000, (1, args.seq), generator=generator)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = times[1:] or times
    return {"side": side, "tokens_per_s": args.seq * len(timed) / sum(timed), "step_s": times,
            "peak_rss_gb": peak_rss() / 2**30, "losses": losses, "trainable": sum(p.numel() for p in trainable)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternations of the two sides")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train(args.child, args.model, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        params = write_model(Path(tmp), args)
        runs = {"qlora": [], "transformers+peft+bitsandbytes": []}
        for _ in range(args.rounds):
            for side, label in (("qlora", "qlora"), ("bnb", "transformers+peft+bitsandbytes")):
                command = [sys.executable, __file__, "--child", side, "--model", tmp,
                           *(f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "model", "rounds"))]
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if done.returncode != 0:
                    raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
                runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for label, results in runs.items():
        rows.append({"implementation": label, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
                     "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in results),
                     "first_loss": results[0]["losses"][0], "trainable": results[0]["trainable"]})
    ours, theirs = rows
    summary = {"tokens_per_s qlora/bnb": ours["tokens_per_s"] / theirs["tokens_per_s"],
               "peak_rss qlora/bnb": ours["peak_rss_gb"] / theirs["peak_rss_gb"]}
    print_table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows], list(rows[0]))
    print("  ".join(f"{k}: {v:.2f}" for k, v in summary.items()))
    path = write_results("train_cpu", {
        "device": device_name(), "versions": versions("peft"), "parameters": params,
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "seq", "steps", "threads", "rounds")},
        "quant": "nf4 + double quant, blocksize 64, compute bf16", "lora": {**LORA, "target_modules": TARGETS},
        "measure": "tokens/s over the steps after the first; peak RSS (VmHWM) of each side's own process",
        "rows": rows, "summary": summary, "runs": runs,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
