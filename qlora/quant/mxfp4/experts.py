"""ExpertWeightMXFP4: a stack of E expert matrices [E, out, in] in MXFP4, as gpt-oss publishes them.

The format (OCP Microscaling spec v1.0, MXFP4): blocks of 32 consecutive elements along a row share
one E8M0 scale (a uint8 exponent, 2^(s - 127)); each element is FP4 E2M1 (1 sign, 2 exponent, 1
mantissa bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), two per byte, the FIRST element in
the LOW nibble (the opposite of bitsandbytes' NF4). 4.25 bits per weight.

gpt-oss's checkpoints hold `experts.gate_up_proj_blocks` uint8 [E, out, in / 32, 16] and
`experts.gate_up_proj_scales` uint8 [E, out, in / 32] (out = 2I, interleaved gate/up rows; the
module itself holds [E, in, out]). The stack keeps those bytes: `packed` [E, out * in / 2] and
`scales` [E, out * in / 32] are the same memory, re-viewed.

Why held as MXFP4 rather than re-quantized to NF4 while streaming: the published weights ARE the
MXFP4 values (gpt-oss was post-trained with its experts in MXFP4), so keeping them is lossless, while
NF4 of those values adds NF4's own rounding on top (relative error 0.074 on the MXFP4 values of a Gaussian
2880x2880 matrix, `python benchmarks/moe_load.py`) to save 0.12 bit per weight. Compute decodes one expert at a time through
the same grouped matmul as the 4-bit stacks (qlora.quant.nf4.experts.grouped_linear).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from qlora.quant.weight import QuantizedWeight, register_format

BLOCK = 32  # elements per E8M0 scale
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_EMAX_ELEMENT = 2  # the largest E2M1 exponent (6 = 1.5 x 2^2): OCP's shared-exponent rule subtracts it


def _e2m1(device) -> torch.Tensor:
    return torch.tensor(_E2M1, dtype=torch.float32, device=device)


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One [out, in] MXFP4 matrix (packed [out * in / 2] uint8, scales [out * in / 32] uint8) as `dtype`.
    Products in fp32 (exact: a power of two times a 2-bit mantissa), one cast."""
    table = _e2m1(packed.device)
    codes = packed.reshape(-1)
    values = torch.stack((table[(codes & 0x0F).long()], table[(codes >> 4).long()]), dim=-1).view(-1, BLOCK)
    exponent = scales.reshape(-1, 1).to(torch.int32) - 127
    return torch.ldexp(values, exponent).view(shape).to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense [out, in] matrix (in a multiple of 32) -> (packed [out * in / 2], scales [out * in / 32]) by
    the OCP rule: scale exponent floor(log2(amax)) - 2, elements rounded to the nearest E2M1 value (ties to
    the even code), saturating at +-6."""
    blocks = weight.float().reshape(-1, BLOCK)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - _EMAX_ELEMENT, torch.zeros_like(amax))
    exponent = exponent.clamp(-127, 127)
    scaled = torch.ldexp(blocks, -exponent.to(torch.int32))
    magnitudes = _e2m1(weight.device)[:8]
    distance = (scaled.abs()[..., None] - magnitudes).abs()
    nearest = distance.min(dim=-1, keepdim=True).values
    odd = torch.arange(8, device=weight.device) % 2
    # Among the magnitudes at the nearest distance, the even code (round half to even).
    code = torch.where(distance == nearest, odd, 2).argmin(dim=-1)
    code = code + 8 * ((scaled < 0) & (code > 0)).long()
    code = code.to(torch.uint8).view(-1, 2)
    packed = code[:, 0] | (code[:, 1] << 4)
    return packed, (exponent.view(-1) + 127).to(torch.uint8)


@register_format("mxfp4-experts")
@dataclasses.dataclass(kw_only=True)
class ExpertWeightMXFP4(QuantizedWeight):
    """E frozen [out, in] matrices in MXFP4; `shape` is (E, out, in), `dtype` the compute dtype."""

    packed: torch.Tensor  # uint8 [E, out * in / 2]
    scales: torch.Tensor  # uint8 [E, out * in / 32]
    shape: torch.Size
    dtype: torch.dtype
    segments: int = 1  # one matrix per expert (the grouped matmul's interface)

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def placeholder(cls, num_experts: int, out_features: int, in_features: int,
                    device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                    **options) -> "ExpertWeightMXFP4":
        if in_features % BLOCK:
            raise ValueError(f"MXFP4 scales blocks of {BLOCK} along a row; an expert of {in_features} inputs is not "
                             "a whole number of blocks")
        n = out_features * in_features
        return cls(packed=torch.empty(num_experts, n // 2, dtype=torch.uint8, device=device),
                   scales=torch.empty(num_experts, n // BLOCK, dtype=torch.uint8, device=device),
                   shape=torch.Size((num_experts, out_features, in_features)), dtype=compute_dtype)

    @classmethod
    def quantize(cls, weight: torch.Tensor, **options) -> "ExpertWeightMXFP4":
        """A dense [E, out, in] stack quantized by the OCP rule (for tests and tools: published MXFP4
        weights are loaded as they are, `from_blocks`)."""
        stack = cls.placeholder(*weight.shape, device=weight.device, compute_dtype=weight.dtype)
        for e in range(weight.shape[0]):
            stack.packed[e], stack.scales[e] = quantize_mxfp4(weight[e])
        return stack

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, scales: torch.Tensor, compute_dtype: torch.dtype,
                    device: torch.device | str = "cpu", where: str = "") -> "ExpertWeightMXFP4":
        """The checkpoint's `*_blocks` [E, out, in / 32, 16] and `*_scales` [E, out, in / 32], as they are."""
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 \
                or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:3]) != tuple(scales.shape):
            raise ValueError(f"{where or 'MXFP4 experts'}: blocks {list(blocks.shape)} {blocks.dtype} and scales "
                             f"{list(scales.shape)} {scales.dtype} are not MXFP4 (uint8 [E, out, in/32, 16] and "
                             "[E, out, in/32])")
        e, out_features, groups = scales.shape
        return cls(packed=blocks.reshape(e, -1).to(device), scales=scales.reshape(e, -1).to(device),
                   shape=torch.Size((e, out_features, groups * BLOCK)), dtype=compute_dtype)

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                        where: str = "") -> "ExpertWeightMXFP4":
        return cls.from_blocks(tensors["blocks"], tensors["scales"], torch.bfloat16, device, where)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """gpt-oss's own entries: `blocks` [E, out, in / 32, 16] and `scales` [E, out, in / 32], byte for byte."""
        e, out_features, in_features = self.shape
        return {"blocks": self.packed.view(e, out_features, in_features // BLOCK, BLOCK // 2),
                "scales": self.scales.view(e, out_features, in_features // BLOCK)}

    # ---- the operations ------------------------------------------------------------------------
    def dequantize_expert(self, e: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        decode = torch.float32 if dtype == torch.float64 else dtype  # fp32 products: widening them is exact
        return dequantize_mxfp4(self.packed[e], self.scales[e], tuple(self.shape[1:]), decode).to(dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return torch.stack([self.dequantize_expert(e, dtype) for e in range(self.num_experts)])

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [E, T, in] -> [E, T, out] (+ bias [E, out]); dX only."""
        from qlora.quant.nf4.experts import grouped_linear

        counts = torch.full((self.num_experts,), x.shape[1], dtype=torch.long)
        y = grouped_linear(x.reshape(-1, x.shape[-1]), self, counts).view(x.shape[0], x.shape[1], -1)
        return y if bias is None else y + bias[:, None, :].to(y.dtype)
