"""The PyTorch twin of the grouped 4-bit kernel: the CPU path and the test oracle.

Each expert with tokens is decoded by kernels/nf4/reference.py (the dense 4-bit layers' decode, bit for
bit) and multiplied as the dense frozen linear is: y rows of e = x rows of e @ dequant(W_e)^T in x's
dtype, dX rows of e = dY rows of e @ dequant(W_e). Reading the counts syncs with the device, which is
why the Triton path computes its schedule inside the kernel instead.
"""
from __future__ import annotations

import torch

from qlora.kernels.nf4 import reference
from qlora.kernels.moe.packed import PackedExperts4bit


def counts_list(counts: torch.Tensor, rows: int) -> list[int]:
    """The counts as ints, checked: none negative and their sum the number of rows."""
    values = [int(c) for c in counts.tolist()]
    if any(c < 0 for c in values) or sum(values) != rows:
        raise ValueError(f"counts must be non-negative tokens per expert summing to the input's {rows} rows, got "
                         f"{values[:8]}{' ...' if len(values) > 8 else ''} (sum {sum(values)})")
    return values


def dequantize_experts_torch(experts: PackedExperts4bit, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) [E, out, in] in `dtype`: every expert through the dense 4-bit twin (tests, export)."""
    return torch.stack([reference.dequantize_4bit_torch(experts.expert(e), dtype) for e in range(experts.num_experts)])


def grouped_matmul_torch(a: torch.Tensor, experts: PackedExperts4bit, counts: torch.Tensor,
                         transpose_weight: bool) -> torch.Tensor:
    """a [T, in] @ W_e^T per expert's rows if transpose_weight, else a [T, out] @ W_e; in a's dtype."""
    _, out_features, in_features = experts.shape
    out = a.new_empty((a.shape[0], out_features if transpose_weight else in_features))
    start = 0
    for e, count in enumerate(counts_list(counts, a.shape[0])):
        if count:
            weight = reference.dequantize_4bit_torch(experts.expert(e), a.dtype)
            rows = a[start:start + count]
            out[start:start + count] = (reference.linear_dequantized(rows, weight, None) if transpose_weight
                                        else reference.linear_dequantized_grad_input(rows, weight))
            start += count
    return out
