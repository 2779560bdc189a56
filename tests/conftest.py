import importlib.util
import logging

import pytest
import torch

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
requires_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (it is only a test oracle)")


def bnb_functional():
    """bitsandbytes.functional, imported quietly (its CPU backend logs about optional kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnb_f

    return bnb_f


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
