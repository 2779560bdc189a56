"""The GPTQ kernels' self-checks (kernels/selfcheck.py runs them on first use of each path): a 4-bit
GPTQ weight of random words and scales through each Triton path against the PyTorch twin."""
from __future__ import annotations

import torch

from qlora.kernels.gptq.format import PackedGPTQ
from qlora.kernels.gptq.reference import dequantize_gptq_torch, matmul_gptq_torch
from qlora.kernels.selfcheck import TOLERANCE, register, rel_err


def sample_weight(device: torch.device, out_features: int = 64, in_features: int = 128, group_size: int = 32,
                  seed: int = 0) -> PackedGPTQ:
    """4 bits, v1 zeros, groups of 32 along K: random packed words need no quantizer."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    word = lambda *shape: torch.randint(-2**31, 2**31, shape, dtype=torch.int64, generator=g).to(torch.int32)  # noqa: E731
    weight = PackedGPTQ(qweight=word(in_features * 4 // 32, out_features), qzeros=word(groups, out_features * 4 // 32),
                        scales=(torch.rand(groups, out_features, generator=g) * 0.02 + 0.001).to(torch.float16),
                        g_idx=(torch.arange(in_features) // group_size).to(torch.int32), perm=None, bits=4,
                        zero_offset=1, shape=(out_features, in_features))
    return PackedGPTQ(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in weight))


@register("gptq_dequantize")
def check_dequantize(device, dtype):
    from qlora.kernels.gptq.triton import dequantize_gptq_triton

    weight = sample_weight(device)
    got, want = dequantize_gptq_triton(weight, dtype), dequantize_gptq_torch(weight, dtype)
    mismatched = (got != want).sum().item()
    return mismatched == 0, f"{mismatched} of {got.numel()} elements differ from the reference"


def _product_check(rows: int, forward_only: bool):
    def check(device, dtype):
        from qlora.kernels.gptq import triton as kernels

        weight = sample_weight(device)
        g = torch.Generator().manual_seed(1)
        errors = []
        for transpose_weight in (True,) if forward_only else (True, False):
            features = weight.shape[1] if transpose_weight else weight.shape[0]
            a = torch.randn(rows, features, generator=g).to(device=device, dtype=dtype)
            if forward_only:
                got = kernels.gemv_gptq(a, weight, None)
            else:
                got = kernels.matmul_gptq_forward(a, weight, None) if transpose_weight else kernels.matmul_gptq_backward(a, weight)
            want = matmul_gptq_torch(a.float(), weight, None, transpose_weight)
            errors.append(rel_err(got, want))
        worst = max(errors)
        return worst < TOLERANCE[dtype], f"relative error {worst:.2e} ({errors}), tolerance {TOLERANCE[dtype]:.0e}"
    return check


register("gptq_fused")(_product_check(20, forward_only=False))
register("gptq_gemv")(_product_check(1, forward_only=True))


@register("cpu_gptq_dequantize")
def check_cpu_dequantize(device, dtype):
    """The C decode (cpu.py), built for this CPU: bit-exact against the twin, with an act-order permutation."""
    from qlora.kernels.gptq.cpu import dequantize_gptq_cpu

    weight = sample_weight(device)
    perm = torch.randperm(weight.shape[1], generator=torch.Generator().manual_seed(2)).to(device)
    weight = weight._replace(perm=perm, g_idx=weight.g_idx[perm].contiguous())
    got, want = dequantize_gptq_cpu(weight, dtype), dequantize_gptq_torch(weight, dtype)
    mismatched = (got.view(-1).view(torch.uint8) != want.view(-1).view(torch.uint8)).sum().item()
    return mismatched == 0, f"{mismatched} of {got.numel() * got.element_size()} bytes differ from the reference"
