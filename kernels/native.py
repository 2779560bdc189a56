"""The CPU kernels written in C, built on first use with the machine's C compiler and loaded with ctypes.

Why C and not torch.compile: both need a compiler at run time, but a 100-line C file builds in
about a second (-O3 -march=native, for the CPU it runs on) and is cached by its source hash, where
inductor compiles a graph per shape family (seconds each) and its decode loops with table
lookups stay scalar; measured in docs/kernels.md ("The CPU path"). ctypes releases the GIL during a
call, so the callers split the work into ranges and run them on threads (`parallel_ranges`).

No compiler (or a failed build): `load` returns None, warns once naming the compiler it looked for,
and the callers fall back to the PyTorch twin. `QLORA_CPU_CC` names another compiler; the cache
is `$QLORA_CACHE_DIR/native` (default ~/.cache/qlora/native).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("qlora.kernels")
# No FMA contraction: the twins round a product and then a sum; a fused multiply-add rounds once
# and would change the decoded bytes.
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno")
KERNELS = Path(__file__).parent  # native_convert.h, the conversions every kernel shares
_lock = threading.Lock()
_failures: dict[str, str] = {}


def compiler() -> Optional[str]:
    """The C compiler: $QLORA_CPU_CC, else $CC, else cc / gcc / clang on the PATH."""
    for name in (os.environ.get("QLORA_CPU_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    root = os.environ.get("QLORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qlora")
    return Path(root) / "native"


def _build(source: Path, cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        # -march=native first (AVX-512 / NEON for this machine); some compilers or CPUs refuse it.
        for arch in (("-march=native",), ("-mcpu=native",), ()):
            done = subprocess.run([cc, *FLAGS, *arch, f"-I{KERNELS}", str(source), "-o", str(built)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            lines = done.stderr.strip().splitlines()
            raise RuntimeError(next((line for line in lines if "error" in line), lines[-1] if lines else "compiler failed"))
        os.replace(built, target)  # atomic: another process loading the cache sees all or nothing


@functools.cache
def load(source: Path) -> Optional[ctypes.CDLL]:
    """The shared library built from `source` (a .c file beside its kernels), or None when it cannot be
    built here (warned once per source)."""
    cc = compiler()
    if cc is None:
        _warn_once(source, "no C compiler found (looked for $QLORA_CPU_CC, $CC, cc, gcc, clang); "
                           "install gcc or clang for the fast CPU path")
        return None
    try:
        text = source.read_bytes() + (KERNELS / "native_convert.h").read_bytes()
        # The machine's name is in the key: -march=native code built on one CPU may not run on another
        # sharing the home directory.
        key = hashlib.sha256(text + cc.encode() + " ".join(FLAGS).encode() + platform.machine().encode()
                             + platform.node().encode()).hexdigest()[:16]
        target = cache_dir() / f"{source.parent.name}_{source.stem}-{key}.so"
        with _lock:
            if not target.exists():
                _build(source, cc, target)
                log.info("built the CPU kernels of %s with %s into %s", source.name, cc, target)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as error:
        _warn_once(source, f"building {source.name} with {cc} failed ({error})")
        return None


I64, PTR, INT, FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# Libraries whose functions are typed, held so that an id is never reused: after load.cache_clear() a
# new CDLL could otherwise take a freed one's id and be called untyped (pointers cut to 32 bits).
_typed: dict[int, ctypes.CDLL] = {}


def library(source: Path, signatures: dict[str, tuple]) -> Optional[ctypes.CDLL]:
    """`load(source)` with each function of `signatures` ({name: argument ctypes}) typed, returning
    nothing; None where it cannot be built."""
    lib = load(source)
    if lib is not None and id(lib) not in _typed:
        for name, argtypes in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, None
        _typed[id(lib)] = lib
    return lib


DTYPE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # OUT_* of native_convert.h


def _warn_once(source: Path, why: str) -> None:
    if source.name not in _failures:
        _failures[source.name] = why
        warnings.warn(f"{why}: the CPU path runs the PyTorch reference instead (bit for bit the same, slower)",
                      RuntimeWarning, stacklevel=4)


def failures() -> dict[str, str]:
    """{source file: why it could not be built} for `qlora doctor`."""
    return dict(_failures)


POOL_THREAD_PREFIX = "qlora-cpu"  # qlora.fast_exit knows these workers: idle between calls, safe to end


@functools.cache
def _pool(workers: int, pid: int) -> concurrent.futures.ThreadPoolExecutor:
    # Keyed by process id: a forked child inherits the parent's pool object but none of its threads,
    # and work submitted to it would wait forever.
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=POOL_THREAD_PREFIX)


def parallel_ranges(run: Callable[[int, int], None], count: int, min_per_thread: int) -> None:
    """run(first, last) over [0, count) in torch.get_num_threads() contiguous ranges of at least
    `min_per_thread` items (below that a thread's start costs more than it saves: ~20 us)."""
    threads = max(1, min(torch.get_num_threads(), count // max(min_per_thread, 1)))
    if threads == 1:
        run(0, count)
        return
    bounds = [count * i // threads for i in range(threads + 1)]
    pool = _pool(threads, os.getpid())
    futures = [pool.submit(run, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    run(bounds[0], bounds[1])  # this thread does a share too
    for future in futures:
        future.result()


# Transparent huge pages for large decode outputs: a fresh 33.5 MB output (4096x4096 bf16) is a new
# mmap whose 8192 first-touch page faults cost more than the decode itself (measured: 64-95 ms to
# allocate and fill it with 4 KB pages, 16-18 ms with 2 MB pages, decode 25 ms, on the shared 2-core
# machine). Linux only (MADV_HUGEPAGE); elsewhere, or where THP is off, a plain allocation.
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MIN_HUGE_BYTES = 8 * HUGE_PAGE


@functools.cache
def _madvise():
    if platform.system() != "Linux":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


def empty_output(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype) on CPU, backed by huge pages where it is large enough to matter."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if nbytes >= MIN_HUGE_BYTES else None
    if madvise is not None:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the whole 2 MB pages inside the buffer
        end = (out.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            madvise(start, end - start, MADV_HUGEPAGE)  # advice only: a refusal leaves 4 KB pages
    return out


def pointer(tensor: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if tensor is None else tensor.data_ptr())
