"""A 4-bit linear layer's forward + backward(dX) on CPU: qlora's PyTorch path vs bitsandbytes' CPU
backend and a dense F.linear, in the same run. Writes benchmarks/results/linear_cpu.json.

    python benchmarks/linear_cpu.py [--m 512] [--size 4096] [--repeats 5]

NF4 + double quant, blocksize 64, the same random weight for every layer. Each compute dtype is a
separate row: the layers compute in it (bitsandbytes' CPU matmul rounds through bf16 even when
asked for fp32, see docs/formats.md). Ratios are bitsandbytes time / qlora time
(> 1: qlora is faster) and qlora time / dense time (the cost of 4 bits over a dense layer).
"""
from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

import qlora
from common import device_name, median_time, print_table, versions, write_results


def forward_backward(layer_or_fn, xs: list[torch.Tensor], grad: torch.Tensor):
    """A callable running forward + backward(dX) on a rotating pool of inputs."""
    state = {"i": 0}

    def run():
        x = xs[state["i"] % len(xs)]
        state["i"] += 1
        layer_or_fn(x).backward(grad)
        x.grad = None
    return run


def bitsandbytes_layer(weight: torch.Tensor, dtype: torch.dtype):
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        return None
    n, k = weight.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64, quant_type="nf4",
                                     compress_statistics=True)
    return layer.to("cpu")  # bitsandbytes quantizes a Params4bit when it is moved to a device


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=512, help="rows of the input (tokens)")
    parser.add_argument("--size", type=int, default=4096, help="in = out features")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(args.size, args.size) * 0.02
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(args.m, args.size, dtype=dtype, requires_grad=True) for _ in range(3)]
        grad = torch.randn(args.m, args.size, dtype=dtype)
        ours = qlora.Linear4bit(args.size, args.size, bias=False, compute_dtype=dtype)
        ours.set_weight(weight)
        dense = weight.to(dtype)
        row = {"dtype": str(dtype).removeprefix("torch."), "M": args.m, "N=K": args.size,
               "qlora_ms": 1e3 * median_time(forward_backward(ours, xs, grad), args.repeats, warmup=1),
               "dense_F.linear_ms": 1e3 * median_time(forward_backward(lambda x: F.linear(x, dense), xs, grad),
                                                      args.repeats, warmup=1)}
        theirs = bitsandbytes_layer(weight, dtype)
        if theirs is not None:
            row["bnb_ms"] = 1e3 * median_time(forward_backward(theirs, xs, grad), args.repeats, warmup=1)
            row["bnb_over_qlora"] = row["bnb_ms"] / row["qlora_ms"]
        row["qlora_over_dense"] = row["qlora_ms"] / row["dense_F.linear_ms"]
        rows.append(row)
        print_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()}], list(row))
    if "bnb_ms" not in rows[0]:
        print("bitsandbytes is not installed: measured qlora and the dense layer only "
              "(pip install bitsandbytes for the comparison)")
    path = write_results("linear_cpu", {
        "device": device_name(), "versions": versions(), "quant": "nf4 + double quant, blocksize 64",
        "measure": "forward + backward(dX), median ms", "repeats": args.repeats, "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
