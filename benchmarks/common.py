"""Shared bits of the benchmark scripts: timing, environment description, results files."""
from __future__ import annotations

import json
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def median_time(fn, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds (CPU: the machine is shared, so medians of many)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def versions(*packages: str) -> dict:
    found = {}
    for name in ("qlora", "torch", "transformers", "safetensors", "bitsandbytes", *packages):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
