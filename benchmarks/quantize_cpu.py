"""Quantize / dequantize speed of a 4096x4096 weight on CPU, every format, 1 and 2 threads: qlora's
CPU path against its PyTorch twin (QLORA_BACKEND=torch) and bitsandbytes' CPU backend, in the same
run. Writes benchmarks/results/quantize_cpu.json.

    python benchmarks/quantize_cpu.py [--size 4096] [--rounds 3] [--repeats 5] [--threads 1,2]

Rows: NF4 + double quant, NF4, FP4 (blocksize 64), LLM.int8, GPTQ 4-bit (group 128, act order;
no bitsandbytes peer). The 4-bit rows time the quantize too: the C quantize, the twin's and
bitsandbytes'. Dequantize writes bf16 (the compute dtype of training), quantize reads the
bf16 weight. Implementations are timed interleaved (`rounds` rounds of each, median of `repeats`
calls): the machine is shared, and a row's noise is the max/min of qlora's per-round medians.
Every qlora output is checked against the twin's (bytes) and bitsandbytes' before timing.
"""
from __future__ import annotations

import argparse
import logging
import statistics

import torch

import qlora
from common import device_name, median_time, print_table, versions, write_results
from qlora.kernels import set_backend
from qlora.kernels.gptq import ops as gptq_ops
from qlora.kernels.int8 import ops as int8_ops


def on_backend(backend: str, fn):
    def forced():
        set_backend(backend)
        try:
            return fn()
        finally:
            set_backend(None)
    return forced


def cases(w: torch.Tensor, bnb_f):
    """{name: {"qlora"/"twin"/"bnb" dequantize, "qlora quantize"/"twin quantize"/"bnb quantize": callables}}."""
    out = {}
    for name, quant_type, double_quant in (("nf4+dq", "nf4", True), ("nf4", "nf4", False), ("fp4", "fp4", False)):
        packed, state = qlora.quantize_4bit(w, quant_type, 64, double_quant)
        deq = lambda packed=packed, state=state: qlora.dequantize_4bit(packed, state, torch.bfloat16)  # noqa: E731
        quantize = lambda q=quant_type, d=double_quant: qlora.quantize_4bit(w, q, 64, d)  # noqa: E731
        case = {"qlora": on_backend("cpu", deq), "twin": on_backend("torch", deq),
                "qlora quantize": on_backend("cpu", quantize), "twin quantize": on_backend("torch", quantize)}
        if bnb_f is not None:
            p, s = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
            assert torch.equal(p, packed), "packed bytes differ from bitsandbytes': the comparison would be meaningless"
            assert torch.equal(bnb_f.dequantize_4bit(p, s), case["qlora"]()), "dequantized W differs from bitsandbytes'"
            case["bnb"] = lambda p=p, s=s: bnb_f.dequantize_4bit(p, s)
            case["bnb quantize"] = lambda q=quant_type, d=double_quant: bnb_f.quantize_4bit(
                w, blocksize=64, compress_statistics=d, quant_type=q)
        out[name] = case
    int8 = qlora.Weight8bit.quantize(w)
    codes, scb = int8.codes, int8.scb
    deq = lambda: int8_ops.int8_dequantize(codes, scb, torch.bfloat16)  # noqa: E731
    out["int8"] = {"qlora": on_backend("cpu", deq), "twin": on_backend("torch", deq)}
    if bnb_f is not None and hasattr(bnb_f, "int8_vectorwise_dequant"):
        # bitsandbytes' int8 decode writes fp32 (its matmul casts after): the cast is added to compare like for like.
        out["int8"]["bnb"] = lambda: bnb_f.int8_vectorwise_dequant(codes, scb).to(torch.bfloat16)
    packed_gptq = qlora.GPTQWeight.quantize(w, bits=4, group_size=128, desc_act=True).kernel_view()
    deq = lambda: gptq_ops.dequantize(packed_gptq, torch.bfloat16)  # noqa: E731
    out["gptq4"] = {"qlora": on_backend("cpu", deq), "twin": on_backend("torch", deq)}
    for name, case in out.items():
        got, want = case["qlora"](), case["twin"]()
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{name}: the CPU path is not the twin's bytes"
        if "qlora quantize" in case:
            (packed, state), (want_packed, want_state) = case["qlora quantize"](), case["twin quantize"]()
            assert torch.equal(packed, want_packed) and torch.equal(state.absmax, want_state.absmax), \
                f"{name}: the CPU quantize is not the twin's bytes"
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, dtype=torch.bfloat16)
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnb_f
    except ImportError:
        bnb_f = None
        print("bitsandbytes is not installed: measuring qlora alone (pip install bitsandbytes for the comparison)")
    all_cases = cases(w, bnb_f)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, case in all_cases.items():
            rounds = {impl: [] for impl in case}
            for _ in range(args.rounds):
                for impl, fn in case.items():
                    rounds[impl].append(1e3 * median_time(fn, args.repeats, warmup=1))
            ms = {impl: statistics.median(times) for impl, times in rounds.items()}
            row = {"case": name, "threads": threads, **{f"{impl} ms": t for impl, t in ms.items()},
                   "noise": max(rounds["qlora"]) / min(rounds["qlora"]),
                   "dequantize twin/qlora": ms["twin"] / ms["qlora"]}
            if "bnb" in ms:
                row["dequantize bnb/qlora"] = ms["bnb"] / ms["qlora"]
            if "twin quantize" in ms:
                row["quantize twin/qlora"] = ms["twin quantize"] / ms["qlora quantize"]
            if "bnb quantize" in ms:
                row["quantize bnb/qlora"] = ms["bnb quantize"] / ms["qlora quantize"]
            rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    shown = [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print(f"{args.size}x{args.size} bf16 weight, blocksize 64 (ratios: the other's time / qlora's; > 1: qlora is faster)")
    print_table(shown, columns)
    path = write_results("quantize_cpu", {
        "device": device_name(), "versions": versions(), "shape": [args.size, args.size], "dtype": "bfloat16",
        "blocksize": 64, "rounds": args.rounds, "repeats": args.repeats,
        "qlora": "the CPU path (QLORA_BACKEND=cpu: the C decode and the C quantize); twin: QLORA_BACKEND=torch",
        "noise": "max/min of qlora's per-round medians", "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
