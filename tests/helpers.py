"""Shared test helpers. Tests import these by bare name: pytest puts tests/ on sys.path, never
the repository root, whose kernels/ folder would shadow Hugging Face's `kernels` package."""
import importlib.util
import logging

import pytest

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
requires_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (it is only a test oracle)")


def bnb_functional():
    """bitsandbytes.functional, imported quietly (its CPU backend logs about optional kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnb_f

    return bnb_f


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
