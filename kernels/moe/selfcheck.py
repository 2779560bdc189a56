"""The grouped kernel's self-check (kernels/selfcheck.py runs it on first use per device and dtype): a
double-quantized stack of random bytes, counts with an empty expert, one with a single row and one
spanning two row tiles, forward and backward against the twin's products on the same decoded experts."""
from __future__ import annotations

import torch

from qlora.kernels.moe.packed import PackedExperts4bit
from qlora.kernels.nf4.selfcheck import sample_weight
from qlora.kernels.selfcheck import TOLERANCE, register, rel_err

COUNTS = (5, 0, 1, 20)  # 26 rows: an expert without tokens, one with a single row, one over two 16-row tiles


def sample_experts(device: torch.device, out_features: int = 48, in_features: int = 128, blocksize: int = 64) -> PackedExperts4bit:
    """len(COUNTS) experts, each nf4.selfcheck's random double-quantized weight with its own seed."""
    return PackedExperts4bit.stack([sample_weight(device, out_features, in_features, blocksize, seed=e)
                                    for e in range(len(COUNTS))])


@register("moe_grouped")
def _check_grouped(device, dtype):
    from qlora.kernels.moe.grouped import grouped_matmul_4bit
    from qlora.kernels.moe.reference import dequantize_experts_torch

    experts = sample_experts(device)
    dense = dequantize_experts_torch(experts, dtype).double()
    counts = torch.tensor(COUNTS, dtype=torch.int32, device=device)
    expert_of_row = torch.repeat_interleave(torch.arange(len(COUNTS), device=device), counts.long())
    g = torch.Generator().manual_seed(1)
    errors = []
    for transpose_weight in (True, False):
        features = experts.shape[2] if transpose_weight else experts.shape[1]
        a = torch.randn(sum(COUNTS), features, generator=g).to(device=device, dtype=dtype)
        weights = dense[expert_of_row]  # [T, out, in]: each row's own expert
        want = torch.einsum("ti,toi->to" if transpose_weight else "to,toi->ti", a.double(), weights)
        errors.append(rel_err(grouped_matmul_4bit(a, experts, counts, transpose_weight), want))
    worst = max(errors)
    return worst < TOLERANCE[dtype], f"relative error {worst:.2e} (forward, backward: {errors}), tolerance {TOLERANCE[dtype]:.0e}"
