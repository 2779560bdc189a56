"""Held-out perplexity of the embedded model under each quantization format.

The held-out windows are the pretraining run's own validation split (qlora/embedded/pretrain.py:
the corpus tokenized into 256-token windows, a permutation seeded with seed + 1 = 1, the first 2%
held out). GPTQ calibrates on training windows only (decoded back to text), never on held-out ones.
Bits per weight: GPTQ/RTN b-bit g128 stores b bits + an fp16 scale and a b-bit zero per 128 weights
(b + (16 + b)/128, g_idx aside); NF4+DQ 4.127; FP4 without DQ 4.5.
Every variant computes in fp32, so the table shows what the weight format costs, not bf16
activations; "bf16" is the shipped checkpoint's own weights (stored in bf16).

    python benchmarks/quantization_quality.py [--calibration-samples 32] [--only gptq4_g128 ...]

Prints a table and writes benchmarks/results/quantization_quality.json.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, versions, write_results  # noqa: E402

import qlora  # noqa: E402
from qlora.embedded import BASE_MODEL_DIR, corpus  # noqa: E402

SEQ_LEN, VAL_FRACTION, SPLIT_SEED = 256, 0.02, 1  # pretrain.py's defaults (seed 0, permutation seed 0 + 1)


def held_out_split(tokenizer):
    docs = corpus.documents()
    stream = []
    for doc in docs:
        stream += tokenizer(doc, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // SEQ_LEN
    chunks = torch.tensor(stream[: n * SEQ_LEN]).view(n, SEQ_LEN)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, int(n * VAL_FRACTION))
    digest = hashlib.sha256(corpus.DOC_SEPARATOR.join(docs).encode()).hexdigest()[:16]
    return chunks[perm[n_val:]], chunks[perm[:n_val]], digest


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def rtn_model(bits: int, group_size: int):
    """Round-to-nearest onto GPTQ's grid (no calibration), through the same packed format."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                weight = qlora.GPTQWeight.quantize(module.weight, bits=bits, group_size=group_size)
                module.weight.copy_(weight.dequantize(torch.float32))
    return model


def variants(calibration: list[str]):
    from transformers import AutoModelForCausalLM

    fp32 = torch.float32
    gptq = dict(dataset=calibration, model_seqlen=SEQ_LEN, max_calibration_samples=len(calibration), compute_dtype=fp32)
    load = lambda config: qlora.load_model(BASE_MODEL_DIR, quantization_config=config, device="cpu", progress=False)  # noqa: E731
    return {
        "bf16": ("16", lambda: AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR, dtype=fp32)),
        "nf4_dq": ("4.127", lambda: load(qlora.QuantConfig("nf4", double_quant=True, compute_dtype=fp32))),
        "fp4": ("4.5", lambda: load(qlora.QuantConfig("fp4", double_quant=False, compute_dtype=fp32))),
        "rtn_int4_g128": ("4.16", lambda: rtn_model(4, 128)),
        "gptq4_g128": ("4.16", lambda: load(qlora.GPTQQuantConfig(bits=4, group_size=128, **gptq))),
        "gptq4_g128_act_order": ("4.16", lambda: load(qlora.GPTQQuantConfig(bits=4, group_size=128, desc_act=True, **gptq))),
        "gptq3_g128": ("3.16", lambda: load(qlora.GPTQQuantConfig(bits=3, group_size=128, **gptq))),
        "gptq2_g128": ("2.16", lambda: load(qlora.GPTQQuantConfig(bits=2, group_size=128, **gptq))),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    train, held_out, digest = held_out_split(tokenizer)
    calibration = [tokenizer.decode(w) for w in train[: args.calibration_samples]]
    rows = {}
    for name, (bits, build) in variants(calibration).items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        model = build()
        built = time.perf_counter() - start
        rows[name] = {"bits_per_weight": bits, "perplexity": round(perplexity(model, held_out), 3),
                      "build_s": round(built, 1)}
        print(f"{name:24s} {bits:>6s} bits/w  ppl {rows[name]['perplexity']:8.3f}  (built in {built:.0f} s)", flush=True)
        # Written after every variant: a long run stopped half-way keeps what it measured.
        payload = {"device": device_name(), "versions": versions(), "corpus_sha256_16": digest,
                   "held_out_windows": len(held_out), "seq_len": SEQ_LEN, "calibration_windows": len(calibration),
                   "compute_dtype": "float32", "results": rows}
        path = write_results("quantization_quality", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
