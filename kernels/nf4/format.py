"""The rules of the 4-bit format that the kernels and the quantizer share: blocksizes and storage dtypes.

The kernels own them (they index and decode by these rules) and `qlora.quant`, the recipe schema
and the config import them from here, so each rule is written once.
"""
from __future__ import annotations

import torch

from qlora.kernels.dtypes import FLOAT_DTYPES  # noqa: F401  (the layers' dtypes, re-exported for the 4-bit checks)

# bitsandbytes' 4-bit quantizer takes these blocksizes; the nested (double-quant) blocks are 256.
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# What the packed bytes may be stored as: float storage only reinterprets the bytes (FSDP wants one
# float dtype across a module's parameters), it never converts them.
STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)

def check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")


def check_storage_dtype(quant_storage: torch.dtype) -> None:
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of uint8, bfloat16, float16, float32, got {quant_storage}")
