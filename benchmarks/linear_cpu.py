"""A quantized linear layer's forward + backward(dX) on CPU, every format, 1 and 2 threads: qlora's
CPU path against its PyTorch twin (QLORA_BACKEND=torch), bitsandbytes' CPU backend and a dense
F.linear, in the same run. Writes benchmarks/results/linear_cpu.json.

    python benchmarks/linear_cpu.py [--m 512] [--size 4096] [--rounds 3] [--repeats 3] [--threads 1,2]
                                    [--formats nf4+dq,fp4,int8,gptq4] [--dtypes bfloat16,float32] [--append]

Formats: NF4 + double quant and FP4 (blocksize 64), LLM.int8 (threshold 6), GPTQ 4-bit (group 128,
act order; bitsandbytes has none: its peer is PyTorch's CPU int4 GEMM, forward only, see below).
Each compute dtype is a row: the layers compute in it (bitsandbytes' CPU matmul rounds through bf16
even when asked for fp32, see docs/formats.md). The machine is shared, so the implementations are
timed interleaved: `rounds` rounds, each timing every implementation (median of `repeats` calls);
a row reports the median over rounds and the spread (max/min of the rounds' medians of qlora) as
its noise. Ratios: bitsandbytes time / qlora time (> 1: qlora is faster), qlora time / dense time.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch
import torch.nn.functional as F

import qlora
from common import RESULTS, device_name, median_time, print_table, versions, write_results
from qlora.kernels import set_backend


RESULTS_FILE = RESULTS / "linear_cpu.json"


def forward_backward(layer_or_fn, xs: list[torch.Tensor], grad: torch.Tensor):
    """A callable running forward + backward(dX) on a rotating pool of inputs."""
    state = {"i": 0}

    def run():
        x = xs[state["i"] % len(xs)]
        state["i"] += 1
        layer_or_fn(x).backward(grad)
        x.grad = None
    return run


def forward_only(fn, xs: list[torch.Tensor]):
    state = {"i": 0}

    def run():
        with torch.no_grad():
            fn(xs[state["i"] % len(xs)])
        state["i"] += 1
    return run


def on_backend(backend: str, run):
    """`run` with QLORA_BACKEND forced to `backend` ('torch': the twin, 'cpu': the CPU path)."""
    def forced():
        set_backend(backend)
        try:
            run()
        finally:
            set_backend(None)
    return forced


def bitsandbytes_layer(weight: torch.Tensor, dtype: torch.dtype, fmt: str):
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        return None
    n, k = weight.shape
    if fmt == "int8":
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight.to(dtype).clone(), requires_grad=False, has_fp16_weights=False)
        return layer.to("cpu")
    quant_type = {"nf4+dq": "nf4", "fp4": "fp4"}[fmt]
    double_quant = fmt == "nf4+dq"
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type=quant_type, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64, quant_type=quant_type,
                                     compress_statistics=double_quant)
    return layer.to("cpu")  # bitsandbytes quantizes a Params4bit when it is moved to a device


def qlora_layer(weight: torch.Tensor, dtype: torch.dtype, fmt: str):
    n, k = weight.shape
    if fmt == "int8":
        layer = qlora.Linear8bit(k, n, bias=False, compute_dtype=dtype)
    elif fmt == "gptq4":
        layer = qlora.LinearGPTQ(k, n, bias=False, compute_dtype=dtype, bits=4, group_size=128, desc_act=True)
    else:
        layer = qlora.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type=fmt.removesuffix("+dq"),
                                 double_quant=fmt == "nf4+dq")
    layer.set_weight(weight)
    return layer


def torch_int4_forward(weight: torch.Tensor, dtype: torch.dtype):
    """PyTorch's CPU int4 GEMM (tinygemm layout, bf16 scale and zero per group of 128) on the same
    4-bit grid: forward only, and its W is (q - 8) * scale + zero in bf16, not GPTQ's to the bit."""
    n, k = weight.shape
    groups = weight.float().view(n, k // 128, 128)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-8)
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    zero = low + 8 * scale
    scales_and_zeros = torch.stack((scale.view(n, -1).t(), zero.view(n, -1).t()), -1).to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, 128, scales_and_zeros).to(dtype)


def measure_row(fmt: str, dtype: torch.dtype, threads: int, weight: torch.Tensor, args) -> dict:
    torch.set_num_threads(threads)
    xs = [torch.randn(args.m, args.size, dtype=dtype, requires_grad=True) for _ in range(3)]
    grad = torch.randn(args.m, args.size, dtype=dtype)
    ours = qlora_layer(weight, dtype, fmt)
    dense = weight.to(dtype)
    runs = {"qlora": on_backend("cpu", forward_backward(ours, xs, grad)),
            "twin": on_backend("torch", forward_backward(ours, xs, grad)),
            "dense": forward_backward(lambda x: F.linear(x, dense), xs, grad)}
    theirs = bitsandbytes_layer(weight, dtype, fmt) if fmt != "gptq4" else None
    if theirs is not None:
        runs["bnb"] = forward_backward(theirs, xs, grad)
    if fmt == "gptq4":  # forward only: the torch int4 kernel has no backward
        plain = [x.detach() for x in xs]
        runs["qlora_forward"] = on_backend("cpu", forward_only(ours, plain))
        runs["torch_int4_forward"] = forward_only(torch_int4_forward(weight, dtype), plain)
    rounds = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved: every implementation once per round
        for name, run in runs.items():
            rounds[name].append(1e3 * median_time(run, args.repeats, warmup=1))
    row = {"format": fmt, "dtype": str(dtype).removeprefix("torch."), "threads": threads, "M": args.m, "N=K": args.size}
    row.update({f"{name}_ms": statistics.median(times) for name, times in rounds.items()})
    row["noise"] = max(rounds["qlora"]) / min(rounds["qlora"])
    row["twin_over_qlora"] = row["twin_ms"] / row["qlora_ms"]
    if "bnb_ms" in row:
        row["bnb_over_qlora"] = row["bnb_ms"] / row["qlora_ms"]
    if "torch_int4_forward_ms" in row:
        row["int4_over_qlora_forward"] = row["torch_int4_forward_ms"] / row["qlora_forward_ms"]
    row["qlora_over_dense"] = row["qlora_ms"] / row["dense_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=512, help="rows of the input (tokens)")
    parser.add_argument("--size", type=int, default=4096, help="in = out features")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the machine is shared)")
    parser.add_argument("--repeats", type=int, default=3, help="calls per implementation and round")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--formats", default="nf4+dq,fp4,int8,gptq4")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of the existing results file that this run does not measure again")
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(args.size, args.size) * 0.02
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for fmt in args.formats.split(","):
            for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
                row = measure_row(fmt, dtype, threads, weight, args)
                rows.append(row)
                print_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()}], list(row))
    if args.append and RESULTS_FILE.exists():
        measured = {(r["format"], r["dtype"], r["threads"]) for r in rows}
        kept = [r for r in json.loads(RESULTS_FILE.read_text())["rows"]
                if (r.get("format"), r.get("dtype"), r.get("threads")) not in measured]
        rows = kept + rows
    path = write_results("linear_cpu", {
        "device": device_name(), "versions": versions(), "blocksize": 64,
        "measure": "forward + backward(dX), median over interleaved rounds of the median ms of `repeats` calls",
        "qlora": "the CPU path (QLORA_BACKEND=cpu); twin: QLORA_BACKEND=torch", "rounds": args.rounds,
        "repeats": args.repeats, "noise": "max/min of qlora's per-round medians", "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
