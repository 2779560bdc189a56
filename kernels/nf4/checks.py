"""Input checks shared by every 4-bit op: each error names the bad value and the fix.

They read only shapes, dtypes and devices (never tensor values), so they cost no device sync and
are safe inside CUDA-graph capture.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from qlora.kernels.dtypes import FLOAT_DTYPES
from qlora.kernels.nf4.format import STORAGE_DTYPES, check_blocksize
from qlora.kernels.nf4.packed import Packed4bit

ABSMAX_DTYPES = FLOAT_DTYPES
# Kernel index arithmetic is int32: element (r, c) of W sits at r * in + c.
MAX_TRITON_NUMEL = 2**31 - 1


def check_weight(weight: Packed4bit) -> None:
    """The packed weight and its quant state agree with each other and live on one device."""
    packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape = weight
    check_blocksize(blocksize)
    if len(shape) != 2 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"the 4-bit weight must have a 2-D [out_features, in_features] shape, got {list(shape)}")
    numel = math.prod(shape)
    if packed.dtype not in STORAGE_DTYPES:
        raise TypeError(f"packed weight storage must be one of uint8, bfloat16, float16, float32, got {packed.dtype}")
    got_bytes = packed.numel() * packed.element_size()
    if got_bytes != (numel + 1) // 2:
        raise ValueError(f"packed weight has {got_bytes} bytes, shape {list(shape)} needs {(numel + 1) // 2}")
    if code.numel() != 16 or code.dtype != torch.float32:
        raise ValueError(f"code must be the 16 fp32 code values, got {code.numel()} of {code.dtype}")
    blocks = -(-numel // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, {numel} elements in blocks of {blocksize} need {blocks}")
    tensors = {"packed": packed, "absmax": absmax, "code": code}
    if nested_absmax is None:
        if absmax.dtype not in ABSMAX_DTYPES:
            raise TypeError(f"absmax without double quantization must be float32/float16/bfloat16, got {absmax.dtype}; "
                            "uint8 absmax codes need nested_absmax, nested_code and offset")
    else:
        if nested_code is None or offset is None:
            raise ValueError("double quantization needs nested_absmax, nested_code and offset together; one is None")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"with double quantization absmax holds uint8 codes, got {absmax.dtype}")
        if nested_code.numel() != 256 or nested_code.dtype != torch.float32:
            raise ValueError(f"nested_code must be 256 fp32 values, got {nested_code.numel()} of {nested_code.dtype}")
        nested_blocks = -(-blocks // nested_blocksize)
        if nested_absmax.numel() != nested_blocks or nested_absmax.dtype != torch.float32:
            raise ValueError(f"nested_absmax must be {nested_blocks} fp32 values ({blocks} absmax codes in blocks of "
                             f"{nested_blocksize}), got {nested_absmax.numel()} of {nested_absmax.dtype}")
        if offset.numel() != 1 or offset.dtype != torch.float32:
            raise ValueError(f"offset must be one fp32 value, got {offset.numel()} of {offset.dtype}")
        tensors.update(nested_absmax=nested_absmax, nested_code=nested_code, offset=offset)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"the 4-bit weight's tensors are on different devices {devices}; move the layer with .to(device)")


def check_compute_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {dtype}; cast it with .to(torch.bfloat16)")


def check_matmul_input(a: torch.Tensor, weight: Packed4bit, transpose_weight: bool, bias: Optional[torch.Tensor]) -> None:
    """a [M, in] for Y = a W^T (transpose_weight) or a [M, out] for dX = a W."""
    packed, shape = weight.packed, weight.shape
    check_compute_dtype(a.dtype, "the input")
    if a.dim() != 2:
        raise ValueError(f"the 4-bit matmul takes a 2-D input, got shape {list(a.shape)}; reshape(-1, features) it")
    need = shape[1] if transpose_weight else shape[0]
    if a.shape[1] != need:
        what = "input" if transpose_weight else "output gradient"
        raise ValueError(f"{what} has {a.shape[1]} features in its last dimension, the 4-bit weight {list(shape)} needs {need}")
    if a.device != packed.device:
        raise ValueError(f"input is on {a.device} but the 4-bit weight is on {packed.device}; move one with .to()")
    if bias is not None:
        if not transpose_weight:
            raise ValueError("bias applies to the forward product (transpose_weight=True) only")
        if tuple(bias.shape) != (shape[0],):
            raise ValueError(f"bias has shape {list(bias.shape)}, the 4-bit weight {list(shape)} needs [{shape[0]}]")
        check_compute_dtype(bias.dtype, "bias")
        if bias.device != a.device:
            raise ValueError(f"bias is on {bias.device} but the input is on {a.device}; move one with .to()")


def check_triton_size(shape: Sequence[int]) -> None:
    if math.prod(shape) > MAX_TRITON_NUMEL:
        raise ValueError(f"the Triton kernels index a weight with int32 and take at most 2**31 - 1 elements, "
                         f"got {list(shape)}; use QLORA_BACKEND=torch for this layer")
