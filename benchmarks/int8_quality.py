"""Held-out perplexity of the embedded model with its linears in bf16, LLM.int8 and NF4: what each
format costs in quality. The held-out windows are the ones its pretraining validated on (the same
corpus, tokenizer, 256-token windows and seeded 2% split as qlora/embedded/pretrain.py). Writes
benchmarks/results/int8_quality.json.

    python benchmarks/int8_quality.py [--windows 0 (all)]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora
from common import device_name, print_table, versions, write_results
from qlora.embedded import corpus
from qlora.embedded.pretrain import tokenize_chunks

BASE = Path(qlora.__file__).resolve().parent / "embedded" / "base"
SEQ_LEN, VAL_FRACTION, SEED = 256, 0.02, 0  # qlora/embedded/base/training.json


def held_out_windows(tokenizer) -> torch.Tensor:
    chunks, _ = tokenize_chunks(corpus.documents(), tokenizer, SEQ_LEN)
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(SEED + 1))
    return chunks[perm[: max(1, int(len(chunks) * VAL_FRACTION))]]


@torch.no_grad()
def perplexity(model, windows, batch=8) -> float:
    losses = [model(input_ids=b, labels=b).loss.item() for b in windows.split(batch)]
    return math.exp(sum(losses) / len(losses))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=0, help="evaluate the first N held-out windows (0: all)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    windows = held_out_windows(tokenizer)
    if args.windows:
        windows = windows[: args.windows]
    models = {
        "bf16 (dense)": lambda: AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16),
        "fp32 (dense)": lambda: AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32),
        "int8 (LLM.int8, threshold 6)": lambda: qlora.load_model(BASE, qlora.Int8Config(compute_dtype=torch.bfloat16),
                                                                 device="cpu", progress=False),
        "int8 (threshold 0)": lambda: qlora.load_model(BASE, qlora.Int8Config(threshold=0.0,
                                                                              compute_dtype=torch.bfloat16),
                                                       device="cpu", progress=False),
        "nf4 + double quant": lambda: qlora.load_model(BASE, qlora.QuantConfig(compute_dtype=torch.bfloat16),
                                                       device="cpu", progress=False),
    }
    rows, records = [], []
    for name, build in models.items():
        model = build().eval()
        start = time.perf_counter()
        ppl = perplexity(model, windows)
        seconds = time.perf_counter() - start
        size = qlora.memory_footprint(model)
        rows.append({"linears in": name, "perplexity": f"{ppl:.2f}", "MiB": f"{size / 2**20:.2f}",
                     "s": f"{seconds:.1f}"})
        records.append({"model": name, "perplexity": ppl, "footprint_bytes": size, "seconds": seconds})
    print(f"{len(windows)} held-out windows of {SEQ_LEN} tokens")
    print_table(rows, ["linears in", "perplexity", "MiB", "s"])
    write_results("int8_quality", {"device": device_name(), "versions": versions(), "windows": len(windows),
                                   "seq_len": SEQ_LEN, "results": records})


if __name__ == "__main__":
    main()
