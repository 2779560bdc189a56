"""Input checks of the grouped 4-bit ops: each error names the bad value and the fix.

Shapes, dtypes and devices only, never tensor values (no device sync, safe in CUDA-graph capture);
that the counts sum to the rows is checked by the twin, where the counts are read anyway, and the
kernel never reads past the last row whatever they hold.
"""
from __future__ import annotations

import torch

from qlora.kernels.nf4.checks import ABSMAX_DTYPES, check_compute_dtype
from qlora.kernels.nf4.format import STORAGE_DTYPES, check_blocksize
from qlora.kernels.moe.packed import PackedExperts4bit

COUNT_DTYPES = (torch.int32, torch.int64)


def check_experts(experts: PackedExperts4bit) -> None:
    """The stack's tensors agree with its (E, out, in) shape and layout and live on one device."""
    check_blocksize(experts.blocksize)
    shape = tuple(experts.shape)
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"an expert stack has a 3-D [experts, out_features, in_features] shape, got {list(shape)}")
    num_experts, numel = shape[0], experts.expert_numel
    packed = experts.packed
    if packed.dtype not in STORAGE_DTYPES:
        raise TypeError(f"packed expert storage must be one of uint8, bfloat16, float16, float32, got {packed.dtype}")
    need = (numel + 1) // 2
    if packed.dim() < 1 or packed.shape[0] != num_experts or packed.numel() * packed.element_size() != num_experts * need:
        raise ValueError(f"packed experts have shape {list(packed.shape)} of {packed.dtype}; {list(shape)} needs "
                         f"[{num_experts}, {need}] bytes (one row of (out*in + 1)//2 bytes per expert)")
    if experts.code.numel() != 16 or experts.code.dtype != torch.float32:
        raise ValueError(f"code must be the 16 fp32 code values, got {experts.code.numel()} of {experts.code.dtype}")
    blocks = -(-numel // experts.blocksize)
    absmax = experts.absmax
    if absmax.shape[:1] != (num_experts,) or absmax.numel() != num_experts * blocks:
        raise ValueError(f"absmax has shape {list(absmax.shape)}; {num_experts} experts of {numel} elements in blocks "
                         f"of {experts.blocksize} need [{num_experts}, {blocks}]")
    tensors = {"packed": packed, "absmax": absmax, "code": experts.code}
    if not experts.double_quant:
        if absmax.dtype not in ABSMAX_DTYPES:
            raise TypeError(f"absmax without double quantization must be float32/float16/bfloat16, got {absmax.dtype}; "
                            "uint8 absmax codes need nested_absmax, nested_code and offset")
    else:
        nested_absmax, nested_code, offset = experts.nested_absmax, experts.nested_code, experts.offset
        if nested_code is None or offset is None:
            raise ValueError("double quantization needs nested_absmax, nested_code and offset together; one is None")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"with double quantization absmax holds uint8 codes, got {absmax.dtype}")
        if nested_code.numel() != 256 or nested_code.dtype != torch.float32:
            raise ValueError(f"nested_code must be 256 fp32 values, got {nested_code.numel()} of {nested_code.dtype}")
        nested_blocks = -(-blocks // experts.nested_blocksize)
        if (nested_absmax.shape[:1] != (num_experts,) or nested_absmax.numel() != num_experts * nested_blocks
                or nested_absmax.dtype != torch.float32):
            raise ValueError(f"nested_absmax must be [{num_experts}, {nested_blocks}] fp32 ({blocks} absmax codes per "
                             f"expert in blocks of {experts.nested_blocksize}), got {list(nested_absmax.shape)} of "
                             f"{nested_absmax.dtype}")
        if offset.numel() != num_experts or offset.dtype != torch.float32:
            raise ValueError(f"offset must be {num_experts} fp32 values (one per expert), got {offset.numel()} of "
                             f"{offset.dtype}")
        tensors.update(nested_absmax=nested_absmax, nested_code=nested_code, offset=offset)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"the expert stack's tensors are on different devices {devices}; move the layer with .to(device)")


def check_grouped_input(a: torch.Tensor, counts: torch.Tensor, experts: PackedExperts4bit, transpose_weight: bool) -> None:
    """a [T, in] (forward, transpose_weight) or [T, out] (backward), rows sorted by expert; counts [E]."""
    check_compute_dtype(a.dtype, "the input")
    if a.dim() != 2:
        raise ValueError(f"the grouped 4-bit matmul takes a 2-D input of rows sorted by expert, got shape {list(a.shape)}")
    _, out_features, in_features = experts.shape
    need = in_features if transpose_weight else out_features
    if a.shape[1] != need:
        what = "input" if transpose_weight else "output gradient"
        raise ValueError(f"{what} has {a.shape[1]} features, the experts {list(experts.shape)} need {need}")
    if counts.dim() != 1 or counts.shape[0] != experts.shape[0] or counts.dtype not in COUNT_DTYPES:
        raise ValueError(f"counts must be a 1-D int32/int64 tensor of {experts.shape[0]} tokens per expert, got "
                         f"shape {list(counts.shape)} of {counts.dtype}")
    for name, tensor in (("counts", counts), ("the experts", experts.packed)):
        if tensor.device != a.device:
            raise ValueError(f"input is on {a.device} but {name} on {tensor.device}; move one with .to()")
