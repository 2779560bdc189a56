"""The rules of the 4-bit format that the kernels and the quantizer share: blocksizes and dtypes.

The kernels own them (they index and decode by these rules) and `qlora.quant`, the recipe schema
and the config import them from here, so each rule is written once.
"""
from __future__ import annotations

import torch

# bitsandbytes' 4-bit quantizer takes these blocksizes; the nested (double-quant) blocks are 256.
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# What the layers compute in and dequantize to.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What the packed bytes may be stored as: float storage only reinterprets the bytes (FSDP wants one
# float dtype across a module's parameters), it never converts them.
STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)

_FLOAT_DTYPE_NAMES = {dtype_: str(dtype_).removeprefix("torch.") for dtype_ in FLOAT_DTYPES}


def check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")


def check_storage_dtype(quant_storage: torch.dtype) -> None:
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of uint8, bfloat16, float16, float32, got {quant_storage}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", the spelling of config.json and the quant_state JSON."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name, what: str, allow_uint8: bool = False) -> torch.dtype:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.float16"); `what` names the field."""
    if isinstance(name, torch.dtype):
        dtype_ = name
    else:
        text = str(name).removeprefix("torch.")
        by_name = {**{v: k for k, v in _FLOAT_DTYPE_NAMES.items()}, "uint8": torch.uint8}
        if text not in by_name:
            dtype_ = None
        else:
            dtype_ = by_name[text]
    allowed = FLOAT_DTYPES + ((torch.uint8,) if allow_uint8 else ())
    if dtype_ not in allowed:
        names = sorted(dtype_name(d) for d in allowed)
        raise ValueError(f"{what}: unknown dtype {name!r}; expected one of {names}")
    return dtype_
