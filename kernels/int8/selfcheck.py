"""The LLM.int8 kernels' self-checks (kernels/selfcheck.py runs them on first use of each path): random
int8 codes and row scales through each Triton kernel against the PyTorch twin."""
from __future__ import annotations

import torch

from qlora.kernels.int8 import reference
from qlora.kernels.selfcheck import TOLERANCE, register, rel_err


def sample_weight(device: torch.device, out_features: int = 48, in_features: int = 160, seed: int = 0):
    """(codes, SCB) of random bytes and scales, one zero row (SCB 0): no quantizer needed."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    scb = torch.rand(out_features, generator=g) * 2 + 0.01
    codes[out_features // 2], scb[out_features // 2] = 0, 0.0
    return codes.to(device), scb.to(device)


@register("int8_dequantize")
def check_dequantize(device, dtype):
    from qlora.kernels.int8.dequantize import int8_dequantize_triton

    codes, scb = sample_weight(device)
    got, want = int8_dequantize_triton(codes, scb, dtype), reference.int8_dequantize_torch(codes, scb, dtype)
    mismatched = (got != want).sum().item()
    return mismatched == 0, f"{mismatched} of {got.numel()} elements differ from the reference"


@register("int8_matmul")
def check_matmul(device, dtype):
    """The forward with outlier columns (|a| >= 6 in two columns) and a bias, against the twin: the
    same int8 products, so the error is the output rounding plus the outlier product's summation."""
    from qlora.kernels.int8.matmul import int8_linear_triton

    codes, scb = sample_weight(device)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, codes.shape[1], generator=g)
    a[0, 3], a[7, -1] = 9.0, -15.0
    a = a.to(device=device, dtype=dtype)
    bias = torch.randn(codes.shape[0], generator=g).to(device=device, dtype=dtype)
    error = rel_err(int8_linear_triton(a, codes, scb, bias, 6.0), reference.int8_linear_torch(a, codes, scb, bias, 6.0))
    return error < TOLERANCE[dtype], f"relative error {error:.2e}, tolerance {TOLERANCE[dtype]:.0e}"


@register("cpu_int8_dequantize", covers=("cpu_int8_matmul",))
def check_cpu_dequantize(device, dtype):
    """The C decode (cpu.py), built for this CPU: bit-exact against the twin (a zero row included).
    The forward's int8 product is exact integers on both paths, so this covers it."""
    from qlora.kernels.int8.cpu import int8_dequantize_cpu

    codes, scb = sample_weight(device, out_features=37, in_features=97)
    got, want = int8_dequantize_cpu(codes, scb, dtype), reference.int8_dequantize_torch(codes, scb, dtype)
    mismatched = (got.view(torch.uint8) != want.view(torch.uint8)).sum().item() if dtype != torch.float32 else \
        (got.view(torch.int32) != want.view(torch.int32)).sum().item()
    return mismatched == 0, f"{mismatched} of {got.numel()} elements differ from the reference"
