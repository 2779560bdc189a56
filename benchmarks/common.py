"""Shared bits of the benchmark scripts: timing, environment description, results files."""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
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


def write_shards(directory: Path, groups, shard_bytes: int = 1 << 30) -> int:
    """Write a checkpoint as safetensors shards plus the index transformers reads; returns its bytes.

    `groups` yields dicts of tensors, produced lazily by the caller: a group's tensors share a shard,
    and a shard is written (and dropped) once it holds `shard_bytes` (0: every group its own shard),
    so a random multi-GB checkpoint is never whole in memory. Shards are named as save_pretrained
    names them (model-00001-of-00004.safetensors), renamed once their count is known."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    written, shard, size, total = [], {}, 0, 0

    def flush() -> None:
        part = directory / f"shard-{len(written) + 1:05d}.partial"
        save_file(shard, part, metadata={"format": "pt"})
        written.append((part, list(shard)))

    for group in groups:
        for key, tensor in group.items():
            shard[key] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
            total += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
            shard, size = {}, 0
    if shard:
        flush()
    weight_map = {}
    for i, (part, keys) in enumerate(written, 1):
        name = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        part.rename(directory / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


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


def write_results(name: str, payload: dict, path: Path | None = None) -> Path:
    """Write benchmarks/results/<name>.json, or `path` when given."""
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM). Not ru_maxrss: that survives exec, so a
    child would report its parent's peak (streaming_load.py's: the one of writing the checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so that a peak covers one phase only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def release_host_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise), so that the next RSS
    peak measures what comes next, not what earlier work left cached."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ForkedProcess:
    """fn(*args) in a forked copy of this process, with the parts of subprocess.Popen a runner uses
    (stdout lines, wait, kill, returncode). For measuring in a fresh process without paying the
    imports again; never for a process that has initialized CUDA."""

    _open_pipes: set[int] = set()  # read ends a later child must not inherit (EOF would never come)
    _lock = threading.Lock()

    def __init__(self, fn, *args, stderr=None):
        with ForkedProcess._lock:
            read, write = os.pipe()
            self.pid, self.returncode = os.fork(), None
            if self.pid:
                os.close(write)
                ForkedProcess._open_pipes.add(read)
        if self.pid == 0:
            code = 1
            try:
                for fd in ForkedProcess._open_pipes | {read}:
                    os.close(fd)
                os.dup2(write, 1)
                if stderr is not None:
                    os.dup2(stderr.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                reset_peak_rss()  # the peak starts from what the child inherits, not from the parent's past
                fn(*args)
                code = 0
            except BaseException:  # noqa: BLE001 (reported through the exit status and stderr)
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.stdout = os.fdopen(read, "r")

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            with ForkedProcess._lock:
                ForkedProcess._open_pipes.discard(self.stdout.fileno())
                self.stdout.close()
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass


def model_arguments(description: str, quick: str, results: str, table: str):
    """The command line the machine-code model benchmarks share (kernels_static.py, gptq_kernels_static.py):
    --quick (the subset `quick` describes), --out, --no-table, --workers, --from-results."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", default=None, help=f"results path (default benchmarks/results/{results})")
    parser.add_argument("--no-table", action="store_true", help=f"do not rewrite {table}")
    parser.add_argument("--workers", type=int, default=1, help="compiling processes")
    parser.add_argument("--from-results", default=None,
                        help=f"rebuild {table} from a {results}, compiling nothing")
    return parser


def compile_missing(keys, workers: int, compile_one, cache: dict) -> None:
    """Compile every key of `keys` not in `cache` with `compile_one(key) -> (key, constexprs, code)`,
    in `workers` processes (compiling is CPU-bound ptxas; spawned, so each process imports afresh),
    and store (constexprs, code) under the key."""
    todo = sorted(set(keys) - set(cache))
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for i, (key, constexprs, code) in enumerate(pool.imap_unordered(compile_one, todo), 1):
                cache[key] = (constexprs, code)
                print(f"compiled {i}/{len(todo)}: {key}", file=sys.stderr, flush=True)
    else:
        for key in todo:
            cache[key] = compile_one(key)[1:]


def cached_code(key, compile_one, cache: dict):
    """(constexprs, code) of `key`, compiled on first use."""
    if key not in cache:
        compile_missing([key], 1, compile_one, cache)
    return cache[key]


def compiled_record(key, compiled: list, arch: int) -> tuple:
    """(key, the tile constexprs, MachineCode) of the one launch a compile_only block recorded."""
    from qlora.kernels.machine_code import machine_code

    launched = compiled[0]
    return key, {k: v for k, v in launched.constexprs.items() if k.isupper()}, machine_code(launched.kernel, arch)
