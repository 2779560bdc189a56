"""The Triton 4-bit kernels on an H100/H200, against the measured ceilings and bitsandbytes, in one run.

    python benchmarks/kernels_gpu.py [--repeats 50] [--quick]

Measures (CUDA events, warmup, median of --repeats, inputs rotated from a pool of fresh random
tensors, L2 flushed by a 256 MB write before every timed call):
- ceilings: device-to-device copy bandwidth and a bf16 8192^3 cuBLAS GEMM;
- dequantize NF4+DQ -> bf16: ours vs a copy of the same output bytes vs bitsandbytes;
- training fwd + bwd(dX) at M in {2048, 8192, 16384} for (N, K) in the Llama/Mistral shapes:
  fused vs dequantize+cuBLAS vs the dispatch rule vs bf16 F.linear vs bitsandbytes Linear4bit;
- decode M in {1, 4, 16, 64}: GEMV vs fused vs bf16 F.linear vs bitsandbytes (gemv_4bit at M=1);
- the dispatch rule: forward time of every path over an M sweep at 4096x4096, and where they cross.
Writes benchmarks/results/<gpu name>.json with the device, versions and every raw number.
"""
from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys

import torch
import torch.nn.functional as F

from common import print_table, versions, write_results

TRAIN_M = (2048, 8192, 16384)
TRAIN_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))  # (N = out, K = in)
DECODE_M = (1, 4, 16, 64)
SWEEP_M = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
POOL = 3  # input sets rotated between calls, so no call sees the previous call's operands


class Timer:
    """Median milliseconds of fn(i) over repeats, with i rotating over the input pool and L2 flushed."""

    def __init__(self, repeats: int, warmup: int = 5):
        self.repeats, self.warmup = repeats, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # > 50 MB (H100) / 60 MB (H200) L2

    def __call__(self, fn) -> float:
        for i in range(self.warmup):
            fn(i % POOL)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for i in range(self.repeats):
            self.flush.zero_()
            starts[i].record()
            fn(i % POOL)
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def import_bitsandbytes():
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes
        import bitsandbytes.functional as bnb_f

        return bitsandbytes, bnb_f
    except ImportError:
        print("bitsandbytes is not installed: its columns stay empty (pip install bitsandbytes for the comparison)")
        return None, None


def quantized_weight(n: int, k: int):
    import qlora

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = qlora.quantize_4bit(w, "nf4", 64, True)
    return w, packed, state


def weight_bytes(packed, state) -> int:
    """Bytes the 4-bit weight occupies: packed codes + uint8 absmax codes + nested fp32 scales."""
    return (packed.numel() * packed.element_size() + state.absmax.numel()
            + 4 * state.nested_absmax.numel() + 4 * 256 + 4 * 16 + 4)


def measure_ceilings(timer: Timer) -> dict:
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda i: dst.copy_(src))
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm_ms = timer(lambda i: a @ b)
    ceilings = {"copy_GBps": 2 * src.numel() / copy_ms / 1e6, "bf16_gemm_TFLOPs": 2 * 8192**3 / gemm_ms / 1e9}
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s (read + write), bf16 GEMM {ceilings['bf16_gemm_TFLOPs']:.0f} TFLOP/s")
    return ceilings


def bench_dequantize(timer, ceilings, bnb_f, shapes) -> list[dict]:
    from qlora.kernels.nf4.dequantize import dequantize_4bit_triton

    rows = []
    for n, k in shapes:
        w, packed, state = quantized_weight(n, k)
        weight = state.packed_view(packed)
        out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        moved = weight_bytes(packed, state) + out.numel() * 2
        ours = timer(lambda i: dequantize_4bit_triton(weight, torch.bfloat16, out=out))
        copy = timer(lambda i: out.copy_(w))  # moves 4 bytes/param: the 2-byte write is the shared part
        row = {"shape": f"{n}x{k}", "bytes_MB": round(moved / 1e6, 1), "ours_us": round(1e3 * ours, 1),
               "ours_GBps": round(moved / ours / 1e6), "of_copy_ceiling": round(moved / ours / 1e6 / ceilings["copy_GBps"], 2),
               "bf16_copy_us": round(1e3 * copy, 1)}
        if bnb_f is not None:
            bnb_packed, bnb_state = bnb_f.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
            bnb = timer(lambda i: bnb_f.dequantize_4bit(bnb_packed, bnb_state))
            row.update(bnb_us=round(1e3 * bnb, 1), bnb_over_ours=round(bnb / ours, 2))
        rows.append(row)
    return rows


def bench_linear(timer, ceilings, bnb, m_values, shapes, backward: bool) -> list[dict]:
    """fwd (+ bwd dX) per M and shape; times in us, ratios vs bf16 F.linear (>1 = slower than bf16)."""
    from qlora.kernels import linear_4bit, set_backend

    set_backend("triton")
    rows = []
    for n, k in shapes:
        w, packed, state = quantized_weight(n, k)
        weight = state.packed_view(packed)
        bnb_layer = None
        if bnb is not None:
            bnb_layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                          compress_statistics=True, device="cpu")
            bnb_layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
            bnb_layer = bnb_layer.cuda()
        for m in m_values:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(POOL)]
            grads = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(POOL)]

            def step(forward):
                def run(i):
                    y = forward(xs[i])
                    if backward:
                        y.backward(grads[i])
                        xs[i].grad = None
                return run

            paths = ("fused", "dequant_matmul", "auto") if backward else ("gemv", "fused", "dequant_matmul", "auto")
            times = {}
            for path in paths:
                if path == "gemv" and m > 64:
                    continue
                times[path] = timer(step(lambda x, path=path: linear_4bit(x, weight, path=path)))
            times["bf16_F.linear"] = timer(step(lambda x: F.linear(x, w)))
            if bnb_layer is not None:
                if backward or m > 1:
                    times["bnb"] = timer(step(bnb_layer))
                else:  # decode at M=1: bitsandbytes' gemv_4bit kernel, through matmul_4bit's inference path
                    with torch.no_grad():
                        times["bnb"] = timer(step(lambda x: bnb.matmul_4bit(x, bnb_layer.weight.t(), quant_state=bnb_layer.weight.quant_state)))
            flops = 2 * m * n * k * (2 if backward else 1)
            best = min(v for key, v in times.items() if key not in ("bf16_F.linear", "bnb"))
            row = {"M": m, "N": n, "K": k, **{f"{key}_us": round(1e3 * v, 1) for key, v in times.items()},
                   "chosen": _chosen(m), "best_over_bf16": round(best / times["bf16_F.linear"], 2),
                   "TFLOPs_best": round(flops / best / 1e9, 1),
                   "of_gemm_ceiling": round(flops / best / 1e9 / ceilings["bf16_gemm_TFLOPs"], 2)}
            if not backward:  # decode is bound by reading the weight: compare to the copy ceiling
                moved = weight_bytes(packed, state) + 2 * m * (n + k)
                row["weight_GBps_best"] = round(moved / best / 1e6)
                row["of_copy_ceiling"] = round(moved / best / 1e6 / ceilings["copy_GBps"], 2)
            if "bnb" in times:
                row["bnb_over_best"] = round(times["bnb"] / best, 2)
            rows.append(row)
            print_table([row], list(row))
    set_backend(None)
    return rows


def _chosen(m: int) -> str:
    from qlora.kernels.nf4.ops import choose_path

    major, minor = torch.cuda.get_device_capability()
    return choose_path(m, torch.bfloat16, 10 * major + minor)


def dispatch_crossovers(sweep: list[dict]) -> dict:
    """Fastest path per M, and the thresholds this device suggests (to compare with the model's table)."""
    fastest = {}
    for row in sweep:
        candidates = {p: row[f"{p}_us"] for p in ("gemv", "fused", "dequant_matmul") if f"{p}_us" in row}
        fastest[row["M"]] = min(candidates, key=candidates.get)
    gemv_max = max([m for m, p in fastest.items() if p == "gemv"], default=0)
    fused_max = max([m for m, p in fastest.items() if p in ("gemv", "fused")], default=0)
    return {"fastest_path_by_M": fastest, "suggested_GEMV_MAX_M": gemv_max, "suggested_FUSED_MAX_M": fused_max}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="one shape per section, for a smoke run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernels_gpu.py needs a CUDA GPU (an H100 or H200); none is visible here, so nothing was measured.")
        return 0
    torch.manual_seed(0)
    bnb, bnb_f = import_bitsandbytes()
    timer = Timer(args.repeats)
    train_shapes = TRAIN_SHAPES[:1] if args.quick else TRAIN_SHAPES
    train_m = TRAIN_M[:1] if args.quick else TRAIN_M

    ceilings = measure_ceilings(timer)
    print("\ndequantize NF4 + DQ -> bf16")
    dequant = bench_dequantize(timer, ceilings, bnb_f, train_shapes)
    print_table(dequant, list(dequant[0]))
    print("\ntraining: forward + backward(dX), bf16")
    training = bench_linear(timer, ceilings, bnb, train_m, train_shapes, backward=True)
    print("\ndecode: forward, bf16")
    decode = bench_linear(timer, ceilings, bnb, DECODE_M, train_shapes, backward=False)
    print("\ndispatch rule: forward at 4096x4096 over M")
    sweep = bench_linear(timer, ceilings, None, SWEEP_M, ((4096, 4096),), backward=False)
    crossovers = dispatch_crossovers(sweep)
    print(crossovers)

    from qlora.kernels.nf4 import ops

    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    path = write_results(re.sub(r"[^A-Za-z0-9_.-]+", "_", name), {
        "device": name, "versions": versions("triton"), "repeats": args.repeats, "ceilings": ceilings,
        "dequantize": dequant, "training_fwd_bwd_dx": training, "decode": decode,
        "dispatch": {"model_table": ops.path_table(arch), "sweep": sweep, **crossovers},
    })
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
