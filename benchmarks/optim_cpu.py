"""Optimizer step time on CPU, ~50M fp32 parameters, 1 and 2 threads: qlora's 8-bit AdamW on its CPU
path (the C step) against its PyTorch twin (QLORA_BACKEND=torch), bitsandbytes' AdamW8bit on its CPU
backend, and torch.optim.AdamW with fp32 states (foreach, and fused where this torch has it on CPU),
in the same run. Writes benchmarks/results/optim_cpu.json.

    python benchmarks/optim_cpu.py [--params 50] [--rounds 3] [--repeats 3] [--threads 1,2]

The parameters are LoRA-like matrices (12 x 4096 x 1024 = 50.3M at --params 50), each optimizer on
its own copy with the same gradients. Implementations are timed interleaved (`rounds` rounds of each,
median of `repeats` steps): the machine is shared, and a row's noise is the max/min of qlora's
per-round medians. Before timing, one step of the CPU path is checked against the twin's bits.
"""
from __future__ import annotations

import argparse
import logging
import statistics

import torch

from common import device_name, median_time, print_table, versions, write_results
from qlora.kernels import set_backend
from qlora.kernels.optim import cpu as optim_cpu
from qlora.optim import PagedAdamW8bit

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def make_params(total_millions: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    count = max(1, round(total_millions * 1e6 / (4096 * 1024)))
    return [torch.randn(4096, 1024, generator=g) * 0.02 for _ in range(count)]


def optimizer_step(make, weights: list[torch.Tensor], backend: str | None = None):
    """A callable taking one step of the optimizer `make(params)` over copies of `weights` (gradients
    set once: the step time does not depend on their values)."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    optimizer = make(params)

    def step():
        set_backend(backend)
        try:
            optimizer.step()
        finally:
            set_backend(None)
    step.params = params
    return step


def check_bits(weights: list[torch.Tensor]) -> None:
    """Two steps of the CPU path and of the twin on the same parameters: the same bits everywhere."""
    small = [w[:300].clone() for w in weights[:2]]
    sides = [optimizer_step(lambda p: PagedAdamW8bit(p, **HYPER), small, backend) for backend in ("cpu", "torch")]
    for _ in range(2):
        for side in sides:
            side()
    for a, b in zip(*(side.params for side in sides)):
        assert torch.equal(a, b), "the CPU step's parameters differ from the twin's"


def implementations(weights, bnb):
    out = {"qlora": optimizer_step(lambda p: PagedAdamW8bit(p, **HYPER), weights, "cpu"),
           "twin": optimizer_step(lambda p: PagedAdamW8bit(p, **HYPER), weights, "torch")}
    if bnb is not None:
        out["bnb AdamW8bit"] = optimizer_step(lambda p: bnb.optim.AdamW8bit(p, **HYPER), weights)
    out["torch AdamW foreach"] = optimizer_step(lambda p: torch.optim.AdamW(p, **HYPER, foreach=True), weights)
    try:
        fused = optimizer_step(lambda p: torch.optim.AdamW(p, **HYPER, fused=True), weights)
        fused()
        out["torch AdamW fused"] = fused
    except (RuntimeError, ValueError) as error:  # torch builds without a fused CPU AdamW
        print(f"torch.optim.AdamW(fused=True) does not run here: {error}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=50, help="millions of parameters")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
        print("bitsandbytes is not installed: measuring without it (pip install bitsandbytes for the comparison)")
    weights = make_params(args.params)
    numel = sum(w.numel() for w in weights)
    check_bits(weights)
    impls = implementations(weights, bnb)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        rounds = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl, step in impls.items():
                rounds[impl].append(1e3 * median_time(step, args.repeats, warmup=1))
        ms = {impl: statistics.median(times) for impl, times in rounds.items()}
        row = {"threads": threads, **{f"{impl} ms": t for impl, t in ms.items()},
               "noise": max(rounds["qlora"]) / min(rounds["qlora"])}
        row.update({f"{impl}/qlora": t / ms["qlora"] for impl, t in ms.items() if impl != "qlora"})
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    shown = [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print(f"one optimizer step over {numel / 1e6:.1f}M fp32 parameters (ratios: the other's time / qlora's; "
          "> 1: qlora is faster)")
    print_table(shown, columns)
    path = write_results("optim_cpu", {
        "device": device_name(), "versions": versions(), "parameters": numel, "shapes": [list(w.shape) for w in weights],
        "hyperparameters": {**HYPER, "betas": list(HYPER["betas"])}, "rounds": args.rounds, "repeats": args.repeats,
        "qlora": "PagedAdamW8bit on the CPU path (QLORA_BACKEND=cpu, the C step); twin: QLORA_BACKEND=torch",
        "square root": optim_cpu.torch_sqrt().name,
        "noise": "max/min of qlora's per-round medians", "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
