"""Shared test helpers. Tests import these by bare name: pytest puts tests/ on sys.path, never
the repository root, whose kernels/ folder would shadow Hugging Face's `kernels` package."""
import importlib.util
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
requires_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (it is only a test oracle)")


def bnb_functional():
    """bitsandbytes.functional, imported quietly (its CPU backend logs about optional kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnb_f

    return bnb_f


def rounding_tolerance(reference, reduction: int, ops: int = 1) -> float:
    """Absolute tolerance between two float computations of `reference` that differ only in rounding
    (summation order, threads, fused vs unfused): each of `ops` operations in series contributes up to
    eps(dtype) * sqrt(reduction) relative error (random-walk rounding over a length-`reduction` sum),
    scaled by the largest magnitude compared."""
    return ops * torch.finfo(reference.dtype).eps * math.sqrt(reduction) * reference.abs().max().item()


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def run_interpreter_child(test_file) -> None:
    """Run the `test_interp_*` tests of `test_file` in a child pytest with TRITON_INTERPRET=1.

    The interpreter is chosen when a kernel is decorated, from TRITON_INTERPRET at that moment, so
    it needs a fresh process; the parent's suite never sees interpreter mode. Fails if any child
    test fails or is skipped.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("QLORA_BACKEND", None)
    # cwd = tests/: `python -m pytest` puts cwd on sys.path, and the repository root's kernels/
    # folder must not shadow Hugging Face's `kernels` package.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), "-k", "interp_"],
        cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
