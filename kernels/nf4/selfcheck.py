"""The 4-bit kernels' self-checks (kernels/selfcheck.py runs them on first use of each path): a
double-quantized weight of random bytes through each Triton path against the PyTorch twin."""
from __future__ import annotations

from typing import Callable

import torch

from qlora.kernels.nf4 import reference
from qlora.kernels.nf4.packed import Packed4bit
from qlora.kernels.selfcheck import TOLERANCE, register, rel_err


def sample_weight(device: torch.device, out_features: int = 48, in_features: int = 128, blocksize: int = 64,
                  seed: int = 0) -> Packed4bit:
    """A double-quantized 4-bit weight of random bytes and scales (no quantizer needed: the kernel
    and the twin decode the same bytes). in_features % blocksize == 0: the row-tile decode."""
    g = torch.Generator().manual_seed(seed)
    numel = out_features * in_features
    blocks = -(-numel // blocksize)  # a partial last block has its own absmax
    code = torch.sort(torch.rand(16, generator=g) * 2 - 1).values
    weight = Packed4bit(
        packed=torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g),
        absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g), code=code,
        nested_absmax=torch.rand(-(-blocks // 256), generator=g) * 0.1 + 0.01,
        nested_code=torch.sort(torch.rand(256, generator=g) * 2 - 1).values, offset=torch.tensor(0.05),
        blocksize=blocksize, nested_blocksize=256, shape=(out_features, in_features))
    return Packed4bit(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in weight))


@register("dequantize", covers=("dequant_matmul",))
def _check_dequantize(device, dtype):
    from qlora.kernels.nf4.dequantize import dequantize_4bit_triton

    weight = sample_weight(device)
    got = dequantize_4bit_triton(weight, dtype)
    want = reference.dequantize_4bit_torch(weight, dtype)
    mismatched = (got != want).sum().item()
    return mismatched == 0, f"{mismatched} of {got.numel()} elements differ from the reference"


def _product_check(run: Callable, rows: int, out_features: int = 48):
    def check(device, dtype):
        weight = sample_weight(device, out_features)
        w = reference.dequantize_4bit_torch(weight, dtype).double()
        g = torch.Generator().manual_seed(1)
        errors = []
        for transpose_weight in (True, False):
            features = weight.shape[1] if transpose_weight else weight.shape[0]
            a = torch.randn(rows, features, generator=g).to(device=device, dtype=dtype)
            want = a.double() @ (w.T if transpose_weight else w)
            errors.append(rel_err(run(a, weight, transpose_weight), want))
        worst = max(errors)
        return worst < TOLERANCE[dtype], f"relative error {worst:.2e} (forward, backward: {errors}), tolerance {TOLERANCE[dtype]:.0e}"
    return check


def _gemv(a, weight, transpose_weight):
    from qlora.kernels.nf4.gemv import gemv_4bit

    return gemv_4bit(a, weight, transpose_weight)


def _fused(a, weight, transpose_weight):
    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    return matmul_4bit_fused(a, weight, transpose_weight)


def _fused_split(a, weight, transpose_weight):
    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    return matmul_4bit_fused(a, weight, transpose_weight, split_k=2)


register("gemv")(_product_check(_gemv, 3))
_fused_whole, _fused_halves = _product_check(_fused, 20), _product_check(_fused_split, 5, out_features=128)


@register("fused")
def _check_fused(device, dtype):
    """Both codes the fused path launches: 20 rows in one split, and 5 rows (the decode tiles) with
    the reduction split in two, summed by the last split (a 128 x 128 weight: two R tiles both ways)."""
    whole, whole_message = _fused_whole(device, dtype)
    halves, halves_message = _fused_halves(device, dtype)
    return whole and halves, f"one split: {whole_message}; split in two: {halves_message}"


@register("cpu_dequantize")
def _check_cpu_dequantize(device, dtype):
    """The C decode (cpu.py), built for this CPU by its compiler: bit-exact against the twin on
    an odd shape whose last block is partial and whose element count is odd."""
    from qlora.kernels.nf4.cpu import dequantize_4bit_cpu

    weight = sample_weight(device, out_features=37, in_features=97)
    got = dequantize_4bit_cpu(weight, dtype)
    want = reference.dequantize_4bit_torch(weight, dtype)
    mismatched = (got.view(-1).view(torch.uint8) != want.view(-1).view(torch.uint8)).sum().item()
    return mismatched == 0, f"{mismatched} of {got.numel() * got.element_size()} bytes differ from the reference"
