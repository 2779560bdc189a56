"""Quantize / dequantize speed of a 4096x4096 bf16 weight on CPU: qlora vs bitsandbytes' CPU
backend, in the same run. Writes benchmarks/results/quantize_cpu.json.

    python benchmarks/quantize_cpu.py [--size 4096] [--repeats 7]
"""
from __future__ import annotations

import argparse
import logging

import torch

import qlora
from common import device_name, median_time, print_table, versions, write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, dtype=torch.bfloat16)

    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnb_f
    except ImportError:
        bnb_f = None
        print("bitsandbytes is not installed: measuring qlora alone (pip install bitsandbytes for the comparison)")

    rows = []
    for double_quant in (True, False):
        packed, state = qlora.quantize_4bit(w, "nf4", 64, double_quant)
        row = {
            "case": f"nf4{' + DQ' if double_quant else ''}",
            "qlora quantize ms": 1e3 * median_time(lambda: qlora.quantize_4bit(w, "nf4", 64, double_quant), args.repeats),
            "qlora dequantize ms": 1e3 * median_time(lambda: qlora.dequantize_4bit(packed, state), args.repeats),
        }
        if bnb_f is not None:
            p, s = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
            assert torch.equal(p, packed), "outputs differ: the comparison would be meaningless"
            row["bnb quantize ms"] = 1e3 * median_time(
                lambda: bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"), args.repeats)
            row["bnb dequantize ms"] = 1e3 * median_time(lambda: bnb_f.dequantize_4bit(p, s), args.repeats)
            row["quantize speedup"] = row["bnb quantize ms"] / row["qlora quantize ms"]
            row["dequantize speedup"] = row["bnb dequantize ms"] / row["qlora dequantize ms"]
        rows.append(row)

    shown = [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print(f"{args.size}x{args.size} bf16 weight, blocksize 64, {torch.get_num_threads()} threads "
          "(speedup = bitsandbytes time / qlora time)")
    print_table(shown, list(rows[0]))
    path = write_results("quantize_cpu", {
        "device": device_name(), "versions": versions(), "shape": [args.size, args.size], "dtype": "bfloat16",
        "blocksize": 64, "repeats": args.repeats, "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
