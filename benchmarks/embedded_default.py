"""`python train.py` (the embedded default) end to end, as a user runs it: wall time, time in the
training loop, exact match before and after, peak memory; against other checkouts in the same run.

    python benchmarks/embedded_default.py                                   # this checkout, 3 rounds
    python benchmarks/embedded_default.py --peer old=/path/to/venv/bin/python:/path/to/checkout
    python benchmarks/embedded_default.py --rounds 5 -- trainer.max_steps=50

Each run is a fresh `python train.py` process in its checkout (imports, loading and evaluation
included: what the quick start costs), with the before-training score recomputed every time
(QLORA_CACHE_DIR points to an empty folder per run). The checkouts run interleaved, round by round,
so a shared machine's load falls on all of them alike; the table gives medians and the ratio of
each peer's median wall time to this checkout's (> 1: this checkout is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import device_name, print_table, versions, write_results

ROOT = Path(__file__).resolve().parents[1]


def run_once(python: str, checkout: Path, overrides: list[str], work: Path) -> dict:
    """One `python train.py` in `checkout`; its summary.json plus the wall time seen from outside."""
    run_dir = work / "run"
    env = dict(os.environ, QLORA_CACHE_DIR=str(work / "cache"), WANDB_MODE="disabled")
    command = [python, str(checkout / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=str(work), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_seconds": wall, "train_seconds": summary["train_seconds"],
            "exact_match_before": summary.get("exact_match_before"), "exact_match_after": summary.get("exact_match_after"),
            "final_eval_loss": summary["final_eval_loss"], "peak_memory_gb": summary["peak_memory_gb"]}


def describe(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer", action="append", default=[],
                        help="NAME=PYTHON:CHECKOUT, another checkout run with its own interpreter (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/embedded_default.json")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every run")
    args = parser.parse_args(argv)
    sides = {"this": (sys.executable, ROOT)}
    for peer in args.peer:
        name, _, location = peer.partition("=")
        python, _, checkout = location.partition(":")
        if not (name and python and checkout) or not (Path(checkout) / "train.py").is_file():
            raise SystemExit(f"--peer {peer!r}: expected NAME=PYTHON:CHECKOUT with CHECKOUT/train.py")
        sides[name] = (python, Path(checkout))
    runs = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name, (python, checkout) in sides.items():
            with tempfile.TemporaryDirectory() as work:
                runs[name].append(run_once(python, checkout, args.overrides, Path(work)))
            print(f"round {round_ + 1}/{args.rounds} {name}: {runs[name][-1]['wall_seconds']:.1f} s", flush=True)
    rows = []
    base_wall = statistics.median(r["wall_seconds"] for r in runs["this"])
    for name, (python, checkout) in sides.items():
        wall = statistics.median(r["wall_seconds"] for r in runs[name])
        rows.append({"checkout": name, "commit": describe(checkout), "wall_s": round(wall, 1),
                     "train_s": round(statistics.median(r["train_seconds"] for r in runs[name]), 1),
                     "exact_match_after": [r["exact_match_after"] for r in runs[name]],
                     "peak_gb": round(max(r["peak_memory_gb"] for r in runs[name]), 2),
                     "wall_vs_this": round(wall / base_wall, 2)})
    print_table(rows, ["checkout", "commit", "wall_s", "train_s", "exact_match_after", "peak_gb", "wall_vs_this"])
    payload = {"benchmark": "embedded_default", "device": device_name(),
               "versions": versions(), "command": " ".join(["python benchmarks/embedded_default.py", *sys.argv[1:]]),
               "overrides": args.overrides, "rounds": args.rounds, "rows": rows, "runs": runs}
    print(write_results("embedded_default", payload, args.out))


if __name__ == "__main__":
    main()
