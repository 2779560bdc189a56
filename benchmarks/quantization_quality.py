"""Held-out quality of the embedded model under each quantization format.

The held-out windows are the pretraining run's own validation split (qlora/embedded/pretrain.py:
the corpus tokenized into 256-token windows, a permutation seeded with seed + 1 = 1, the first 2%
held out). GPTQ calibrates on training windows only (decoded back to text), never on held-out ones.
Bits per weight: GPTQ/RTN b-bit g128 stores b bits + an fp16 scale and a b-bit zero per 128 weights
(b + (16 + b)/128, g_idx aside); NF4+DQ 4.127; FP4 without DQ 4.5; LLM.int8 8 + a 32-bit scale per
row of 256 or 704 inputs (~8.1).
Every variant computes in fp32, so the table shows what the weight format costs, not bf16
activations; "bf16" is the shipped checkpoint's own weights (stored in bf16), the reference.

Two figures per variant:
- perplexity on the held-out windows (the headline measure);
- KL(bf16 || variant), mean nats per predicted token: how far the quantized model's next-token
  distribution moved from the reference's. A perplexity of ~163 swings by more than the formats
  differ (NF4 can land below bf16 by chance), while the KL is zero only for the reference itself and
  ranks the formats by fidelity. The standard error of the per-window mean is printed with it.

    python benchmarks/quantization_quality.py [--calibration-samples 128] [--windows 0 (all)]
        [--only bf16 gptq4_g128 ...] [--out PATH]

Prints the table and writes benchmarks/results/quantization_quality.json (the reference is always
run first: the KL needs it).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, versions, write_results  # noqa: E402

import qlora  # noqa: E402
from qlora.embedded import BASE_MODEL_DIR, corpus  # noqa: E402

SEQ_LEN, VAL_FRACTION, SPLIT_SEED = 256, 0.02, 1  # pretrain.py's defaults (seed 0, permutation seed 0 + 1)
REFERENCE = "bf16"


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
def evaluate(model, windows: torch.Tensor, reference: list[torch.Tensor] | None):
    """(perplexity, per-window mean KL(reference || model) or None, per-window log-probs)."""
    model.eval()
    losses, kls, logprobs = [], [], []
    for w in windows:
        out = model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0))
        losses.append(out.loss.item())
        logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)  # the positions the loss predicts
        if reference is not None:
            ref = reference[len(logprobs)]
            kls.append(float((ref.exp() * (ref - logp)).sum(-1).mean()))
        logprobs.append(logp)
    return math.exp(sum(losses) / len(losses)), (kls if reference is not None else None), logprobs


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


def variants(calibration: list[str], damp_percent: float):
    """name -> (bits per weight, builder)."""
    from transformers import AutoModelForCausalLM

    fp32 = torch.float32
    gptq = dict(dataset=calibration, model_seqlen=SEQ_LEN, max_calibration_samples=len(calibration), compute_dtype=fp32,
                damp_percent=damp_percent)
    load = lambda config: qlora.load_model(BASE_MODEL_DIR, quantization_config=config, device="cpu", progress=False)  # noqa: E731
    return {
        REFERENCE: ("16", lambda: AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR, dtype=fp32)),
        "int8": ("8.1", lambda: load(qlora.Int8Config(compute_dtype=fp32))),
        "nf4_dq": ("4.127", lambda: load(qlora.QuantConfig("nf4", double_quant=True, compute_dtype=fp32))),
        "fp4": ("4.5", lambda: load(qlora.QuantConfig("fp4", double_quant=False, compute_dtype=fp32))),
        "rtn_int4_g128": ("4.16", lambda: rtn_model(4, 128)),
        "gptq4_g128": ("4.16", lambda: load(qlora.GPTQQuantConfig(bits=4, group_size=128, **gptq))),
        "gptq4_g128_act_order": ("4.16", lambda: load(qlora.GPTQQuantConfig(bits=4, group_size=128, desc_act=True, **gptq))),
        "gptq3_g128": ("3.15", lambda: load(qlora.GPTQQuantConfig(bits=3, group_size=128, **gptq))),
        "gptq2_g128": ("2.14", lambda: load(qlora.GPTQQuantConfig(bits=2, group_size=128, **gptq))),
    }


def parse_args(argv, names):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration-samples", type=int, default=128,
                        help="training windows of 256 tokens GPTQ calibrates on (128: GPTQ's published count)")
    parser.add_argument("--damp-percent", type=float, default=0.01)
    parser.add_argument("--windows", type=int, default=0, help="evaluate the first N held-out windows (0: all)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"a subset of: {' '.join(names)}")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.calibration_samples < 1 or args.windows < 0:
        parser.error(f"--calibration-samples must be >= 1 and --windows >= 0, got {args.calibration_samples} "
                     f"and {args.windows}")
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown variant(s) {' '.join(unknown)}; choose from {' '.join(names)}")
    return args


def main(argv=None):
    names = list(variants([], 0.01))
    args = parse_args(argv, names)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    train, held_out, digest = held_out_split(tokenizer)
    if args.windows:
        held_out = held_out[: args.windows]
    calibration = [tokenizer.decode(w) for w in train[: args.calibration_samples]]
    wanted = [REFERENCE] + [n for n in names if n != REFERENCE and (args.only is None or n in args.only)]
    rows, reference, table = {}, None, []
    path = None
    for name, (bits, build) in variants(calibration, args.damp_percent).items():
        if name not in wanted:
            continue
        start = time.perf_counter()
        model = build()
        built = time.perf_counter() - start
        ppl, kls, logprobs = evaluate(model, held_out, reference)
        if name == REFERENCE:
            reference, kls = logprobs, [0.0] * len(logprobs)
        del model, logprobs
        kl = statistics.fmean(kls)
        stderr = statistics.stdev(kls) / math.sqrt(len(kls)) if len(kls) > 1 else 0.0
        rows[name] = {"bits_per_weight": bits, "perplexity": round(ppl, 3), "kl_vs_bf16": float(f"{kl:.4g}"),
                      "kl_stderr": float(f"{stderr:.2g}"), "build_s": round(built, 1)}
        table.append({"weights": name, "bits/w": bits, "perplexity": f"{ppl:.3f}",
                      "KL vs bf16 (nats/token)": f"{kl:.5f} +- {stderr:.5f}", "build s": f"{built:.0f}"})
        print(f"{name:22s} {bits:>6s} bits/w  ppl {ppl:8.3f}  KL {kl:.5f} +- {stderr:.5f}  (built in {built:.0f} s)",
              flush=True)
        # Written after every variant: a long run stopped half-way keeps what it measured.
        payload = {"command": "python benchmarks/quantization_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "device": device_name(), "versions": versions(), "corpus_sha256_16": digest,
                   "held_out_windows": len(held_out), "seq_len": SEQ_LEN, "calibration_windows": len(calibration),
                   "gptq_damp_percent": args.damp_percent, "compute_dtype": "float32", "reference": REFERENCE,
                   "results": rows}
        path = write_results("quantization_quality", payload, args.out)
    print()
    print_table(table, ["weights", "bits/w", "perplexity", "KL vs bf16 (nats/token)", "build s"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
