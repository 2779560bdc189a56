"""Is the 4-bit model as good as the 16-bit one? Held-out loss and exact match of the embedded task
for 16-bit LoRA, NF4 + double quant QLoRA, FP4 and NF4 + LoftQ, several seeds each.
Writes benchmarks/results/quality.json and quality.png (the loss curves, one figure).

    python benchmarks/quality.py                                  # 4 configurations x 3 seeds, ~20 min on 2 cores
    python benchmarks/quality.py --configs lora16,nf4 --seeds 0   # a subset
    python benchmarks/quality.py --out /tmp/q.json trainer.max_steps=2 trainer.exact_match_examples=4

Every run is `python train.py <config's overrides> trainer.seed=S data.seed=S <extra overrides>`
(composed and run in this process), so a configuration here is exactly a command line. The seed
sets the LoRA initialisation and the order of the training batches; the held-out set is fixed.
Configurations are looked up in CONFIGS: a quantization format that lands later (int8, GPTQ)
is one more entry there.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, device_name, print_table, versions, write_results

# name -> (what it is, overrides). The format comparisons compute in fp32 (quantization=nf4_fp32 and
# the like), so that only the base's format differs between them. The embedded default recipe
# computes with quantization.compute_dtype=auto (bf16 on CPUs with bf16 units): "nf4_auto".
CONFIGS = {
    "lora16": ("16-bit LoRA: the base in its own bf16 weights, computed in fp32",
               ["quantization=none", "quantization.compute_dtype=float32"]),
    "nf4": ("NF4 + double quant QLoRA computing in fp32 (the embedded default before compute_dtype=auto)",
            ["quantization=nf4_fp32"]),
    "nf4_auto": ("NF4 + double quant QLoRA, compute_dtype=auto (the embedded default)", []),
    "fp4": ("FP4 (bitsandbytes' fp4 recipe: no double quant)", ["quantization=fp4", "quantization.compute_dtype=float32"]),
    "nf4_loftq": ("NF4 + double quant, LoftQ initialisation, 4 iterations",
                  ["quantization=nf4_fp32", "lora.init=loftq", "lora.loftq_iter=4"]),
}
# Settings every run shares: evaluate the held-out loss every 25 steps for the curves, no samples
# or intermediate checkpoints (they cost time and change nothing trained).
COMMON = ["trainer.eval_every=25", "trainer.eval_samples=0", "trainer.save_every=0"]

log = logging.getLogger("quality")


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record = {
        "eval_loss": summary["final_eval_loss"], "exact_match": summary.get("exact_match_after"),
        "exact_match_before": summary.get("exact_match_before"), "wall_seconds": summary["wall_seconds"],
        "train_loss": {m["step"]: m["loss"] for m in metrics if "loss" in m},
        "eval_curve": {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m},
    }
    if (run_dir / "loftq.json").is_file():
        report = json.loads((run_dir / "loftq.json").read_text())
        record["loftq"] = {k: report[k] for k in ("iterations", "relative_error_plain", "relative_error_loftq")}
    return record


def train_one(name: str, seed: int, extra: list[str], work: Path, reuse: bool) -> dict:
    from qlora.train.recipes import compose_recipe
    from qlora.train import run

    run_dir = work / name / f"seed-{seed}"
    if reuse and (run_dir / "summary.json").is_file():
        return read_run(run_dir)
    overrides = [*CONFIGS[name][1], *COMMON, f"trainer.seed={seed}", f"data.seed={seed}", *extra]
    cfg = compose_recipe(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run(cfg, run_dir=run_dir)
    log.info("%s seed %d: %.0f s", name, seed, time.perf_counter() - started)
    return read_run(run_dir)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict], seeds: list[int]) -> dict:
    losses = [r["eval_loss"] for r in runs]
    matches = [r["exact_match"] for r in runs if r["exact_match"] is not None]
    steps = sorted(set.intersection(*(set(r["train_loss"]) for r in runs)))
    eval_steps = sorted(set.intersection(*(set(r["eval_curve"]) for r in runs)))
    entry = {
        "eval_loss_mean": statistics.mean(losses), "eval_loss_std": _std(losses),
        "exact_match_mean": statistics.mean(matches) if matches else None,
        "exact_match_std": _std(matches) if matches else None,
        "seeds": seeds,
        "per_seed": [{"seed": s, "eval_loss": r["eval_loss"], "exact_match": r["exact_match"],
                      "exact_match_before": r["exact_match_before"], "wall_seconds": r["wall_seconds"]}
                     for s, r in zip(seeds, runs)],
        "train_loss_mean": [[s, statistics.mean(r["train_loss"][s] for r in runs)] for s in steps],
        "eval_loss_curve_mean": [[s, statistics.mean(r["eval_curve"][s] for r in runs)] for s in eval_steps],
    }
    if all("loftq" in r for r in runs):
        entry["loftq"] = runs[0]["loftq"]  # the reconstruction does not depend on the seed
    return entry


def gaps(configs: dict) -> dict:
    """Relative held-out-loss gaps to 16-bit LoRA, and how much of NF4's gap LoftQ closes."""
    out = {}
    base = configs.get("lora16")
    if base is None:
        return out
    for name, entry in configs.items():
        if name != "lora16":
            out[f"{name}_vs_lora16_relative"] = entry["eval_loss_mean"] / base["eval_loss_mean"] - 1
    if "nf4" in configs and "nf4_loftq" in configs:
        gap = configs["nf4"]["eval_loss_mean"] - base["eval_loss_mean"]
        closed = configs["nf4"]["eval_loss_mean"] - configs["nf4_loftq"]["eval_loss_mean"]
        out["nf4_loftq_vs_nf4_relative"] = configs["nf4_loftq"]["eval_loss_mean"] / configs["nf4"]["eval_loss_mean"] - 1
        # Only a positive gap (NF4 worse than 16-bit) can be closed; otherwise there is no fraction to report.
        out["loftq_fraction_of_nf4_gap_closed"] = closed / gap if gap > 0 else None
    return out


def plot(configs: dict, path: Path, window: int = 10) -> Path:
    """One figure: training loss (moving average over `window` steps, mean of seeds) and held-out loss."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    train_ax, eval_ax = fig.subplots(1, 2)
    for name, entry in configs.items():
        steps, losses = zip(*entry["train_loss_mean"]) if entry["train_loss_mean"] else ((), ())
        smooth = [statistics.mean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        line, = train_ax.plot(steps, smooth, label=name, linewidth=1.2)
        if entry["eval_loss_curve_mean"]:
            eval_steps, eval_losses = zip(*entry["eval_loss_curve_mean"])
            eval_ax.plot(eval_steps, eval_losses, "o-", color=line.get_color(), label=name, markersize=3)
    train_ax.set_title(f"training loss ({window}-step moving average, mean of seeds)")
    eval_ax.set_title("held-out loss (mean of seeds)")
    for ax in (train_ax, eval_ax):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / completion token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run_parallel(argv: list[str], seeds: list[int], jobs: int, work: Path) -> None:
    """This script once per group of seeds, in `jobs` processes sharing the cores (one thread each on 2 cores
    with 2 jobs: no oversubscription); they write their runs into `work`, where the caller reads them."""
    import os
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // jobs)
    groups = [seeds[i::jobs] for i in range(min(jobs, len(seeds)))]
    passed, skip = [], False
    for arg in argv:  # this invocation's arguments without --seeds / --jobs / --out
        if skip:
            skip = False
            continue
        if arg in ("--seeds", "--jobs", "--out", "--plot"):
            skip = True
            continue
        if not arg.startswith(("--seeds=", "--jobs=", "--out=", "--plot=")):
            passed.append(arg)
    work.mkdir(parents=True, exist_ok=True)
    children = []
    for i, group in enumerate(groups):
        command = [sys.executable, str(Path(__file__).resolve()), *passed, "--work", str(work),
                   "--seeds", ",".join(map(str, group)), "--out", str(work / f"partial-{i}.json")]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        log.info("seeds %s: %s", group, " ".join(command))
        children.append(subprocess.Popen(command, env=env, stdout=open(work / f"partial-{i}.log", "w"),
                                         stderr=subprocess.STDOUT))
    failed = [(g, c.wait()) for g, c in zip(groups, children)]
    failed = [(g, code) for g, code in failed if code != 0]
    if failed:
        raise SystemExit(f"runs for seeds {[g for g, _ in failed]} failed; see {work}/partial-*.log")


def results_payload(argv, args, configs: dict, started: float) -> dict:
    return {
        "benchmark": "quality", "device": device_name(), "versions": versions("peft", "accelerate"),
        "command": " ".join(["python benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "common_overrides": COMMON, "extra_overrides": args.overrides,
        "std": "sample standard deviation over seeds (n - 1)",
        "configs": configs, "gaps": gaps(configs), "total_seconds": time.perf_counter() - started,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated integers")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--plot", type=Path, default=None, help="default: the --out path with .png")
    parser.add_argument("--work", type=Path, default=Path("outputs/quality"), help="where the runs are written")
    parser.add_argument("--reuse", action="store_true", help="read runs already finished in --work instead of rerunning")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: aggregate the runs of --seeds already finished in --work (the seeds "
                             "may then differ between configurations; each entry lists its own)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds trained in parallel processes, each with cores/jobs threads (default 1)")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every run, e.g. trainer.max_steps=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")

    started = time.perf_counter()
    reuse = args.reuse
    if args.jobs > 1 and len(seeds) > 1:
        run_parallel(argv if argv is not None else sys.argv[1:], seeds, args.jobs, args.work)
        reuse = True  # every run is on disk now: the loop below only reads them
    if args.finished_only:
        finished = {n: [s for s in seeds if (args.work / n / f"seed-{s}" / "summary.json").is_file()] for n in names}
        configs = {n: {"description": CONFIGS[n][0], "overrides": CONFIGS[n][1],
                       **aggregate([read_run(args.work / n / f"seed-{s}") for s in found], found)}
                   for n, found in finished.items() if found}
        if not configs:
            parser.error(f"no finished runs of {names} for seeds {seeds} in {args.work}")
        payload = results_payload(argv, args, configs, started)
        path = write_results("quality", payload, args.out)
        names, seeds = list(configs), []  # skip the training loop
    runs: dict[str, list[dict]] = {name: [] for name in names}
    # Seed-major order, the results file rewritten after every run: an interrupted benchmark
    # leaves every configuration measured on the same seeds so far (and --reuse continues it).
    for seed in seeds:
        for name in names:
            runs[name].append(train_one(name, seed, args.overrides, args.work, reuse))
            done = seeds[:len(runs[names[-1]])] if runs[names[-1]] else []
            configs = {n: {"description": CONFIGS[n][0], "overrides": CONFIGS[n][1],
                           **aggregate(r[:len(done)], done)} for n, r in runs.items() if done}
            payload = results_payload(argv, args, configs, started)
            if configs:
                path = write_results("quality", payload, args.out)
    figure = plot(configs, args.plot or args.out.with_suffix(".png"))
    rows = [{"config": n, "held-out loss": f"{c['eval_loss_mean']:.4f} ± {c['eval_loss_std']:.4f}",
             "exact match": "n/a" if c["exact_match_mean"] is None
             else f"{100 * c['exact_match_mean']:.1f}% ± {100 * c['exact_match_std']:.1f}",
             "seeds": len(c["seeds"])} for n, c in configs.items()]
    print_table(rows, ["config", "held-out loss", "exact match", "seeds"])
    for key, value in payload["gaps"].items():
        print(f"{key}: {'n/a' if value is None or math.isnan(value) else f'{value:+.4f}'}")
    print(f"wrote {path} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
