"""The dtypes every format's layers compute in, and their names as config.json and the quant_state
JSON spell them. Shared by every format's kernels, quantizer and config, so each rule is written once.
"""
from __future__ import annotations

import torch

# What the layers compute in and dequantize to.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPE_NAMES = {dtype_: str(dtype_).removeprefix("torch.") for dtype_ in FLOAT_DTYPES}



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
