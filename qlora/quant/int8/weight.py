"""LLM.int8 (bitsandbytes' 8-bit format, as transformers saves it) as a QuantizedWeight: Weight8bit.

Per linear layer: `weight` int8 [out, in] row-major = round(127 W / SCB), `SCB` fp32 [out] = per-row
absmax of W, `weight_format` uint8 0 ("row"). Outliers are not stored: the forward finds them in
the activations (|x| >= threshold) and multiplies those columns in 16-bit. The threshold is a
property of the forward, not of the bytes, so it is a field of the weight and comes from the config.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from qlora.errors import DamagedFileError, OptionError
from qlora.kernels.int8 import ops as int8_ops
from qlora.kernels.int8.reference import int8_vectorwise_quant_torch
from qlora.quant.weight import QuantizedWeight, register_format

DEFAULT_THRESHOLD = 6.0
FP16_MAX = 65504.0
# bitsandbytes' weight_format codes (bitsandbytes.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING).
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}
_TILE_LAYOUTS = {
    "col32": "col32 (32-column tiles for cuBLASLt's int8 IMMA)",
    "col_turing": "col_turing (8x32 tiles interleaved for Turing tensor cores)",
    "col_ampere": "col_ampere (32x32 tiles interleaved for Ampere tensor cores)",
}


def int8_vectorwise_quant(a: torch.Tensor, threshold: float = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """bitsandbytes.functional.int8_vectorwise_quant, byte for byte: (CB int8, SCB fp32 per-row
    absmax, outlier column indices or None). Any float dtype; the scaling is computed in fp32; rows
    of zeros give SCB 0 and codes 0. Leading dimensions are flattened into rows."""
    if a.dim() < 1:
        raise OptionError("int8_vectorwise_quant needs a tensor with at least one dimension")
    codes, scb, cols = int8_vectorwise_quant_torch(a.reshape(-1, a.shape[-1]), threshold)
    return codes.reshape(a.shape), scb, cols


def check_threshold(threshold, where: str = "llm_int8_threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise OptionError(f"{where} must be a number >= 0 (6.0 is LLM.int8's default; 0 turns the outlier "
                         f"decomposition off), got {threshold!r}")
    return float(threshold)


def weight_format_name(value, where: str) -> str:
    """'row' for bitsandbytes' weight_format entry (a uint8 tensor, an int, or an old string)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise OptionError(f"{where}: weight_format must be a scalar, got shape {list(value.shape)}")
        value = int(value.item())
    if isinstance(value, int):
        if value not in WEIGHT_FORMATS:
            raise OptionError(f"{where}: weight_format {value} is not one of bitsandbytes' layouts {WEIGHT_FORMATS}")
        value = WEIGHT_FORMATS[value]
    if value not in WEIGHT_FORMATS.values():
        raise OptionError(f"{where}: weight_format {value!r} is not one of bitsandbytes' layouts "
                         f"{sorted(WEIGHT_FORMATS.values())}")
    if value != "row":
        raise OptionError(
            f"{where}: weight_format is {_TILE_LAYOUTS[value]}, a GPU tile layout of bitsandbytes < 0.45; its tile "
            "permutation is defined only by bitsandbytes' old CUDA transform kernel, so it cannot be converted here "
            "with a proof of exactness. Re-save the checkpoint with bitsandbytes >= 0.45 (it writes weight_format 0, "
            "row), or quantize the 16-bit checkpoint with load_in_8bit=True"
        )
    return value


@register_format("int8")
@dataclasses.dataclass(kw_only=True)
class Weight8bit(QuantizedWeight):
    """An LLM.int8 weight: `codes` int8 [out, in] (bitsandbytes' CB), `scb` fp32 [out] (SCB), and the
    outlier threshold its forward uses (0: no decomposition)."""

    data_name = "codes"
    data_key = "weight"
    codes: torch.Tensor
    scb: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype = torch.float16
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self):
        self.threshold = check_threshold(self.threshold, "threshold")

    @classmethod
    def quantize(cls, weight: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> "Weight8bit":
        """As bitsandbytes' Int8Params does: W to fp16, then int8_vectorwise_quant. The same dense
        checkpoint therefore gives the same bytes as transformers + bitsandbytes."""
        if weight.dim() != 2:
            raise OptionError(f"Weight8bit needs a 2-D [out, in] weight, got shape {list(weight.shape)}")
        peak = float(weight.detach().abs().max()) if weight.numel() else 0.0
        if not peak <= FP16_MAX:
            raise OptionError(f"the weight holds {peak:g}, beyond fp16's range ({FP16_MAX:g}) through which "
                             "LLM.int8 quantizes (as bitsandbytes does); this weight cannot be stored in 8 bits")
        codes, scb, _ = int8_vectorwise_quant(weight.detach().to(torch.float16))
        return cls(codes=codes, scb=scb, shape=weight.shape, dtype=weight.dtype, threshold=threshold)

    @classmethod
    def placeholder(cls, out_features: int, in_features: int, device: torch.device | str | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16, threshold: float = DEFAULT_THRESHOLD) -> "Weight8bit":
        return cls(codes=torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                   scb=torch.empty(out_features, dtype=torch.float32, device=device),
                   shape=torch.Size((out_features, in_features)), dtype=compute_dtype, threshold=threshold)

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                        where: str = "", threshold: float = DEFAULT_THRESHOLD) -> "Weight8bit":
        where = where or "8-bit weight"
        codes = tensors.get("weight")
        if codes is None:
            raise DamagedFileError(f"{where}: the int8 weight itself is missing; the checkpoint is incomplete")
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise DamagedFileError(f"{where}: an LLM.int8 weight is int8 [out, in], got {codes.dtype} {list(codes.shape)}; "
                             "the checkpoint is not an 8-bit one, or the layer belongs in llm_int8_skip_modules")
        weight_format_name(tensors.get("weight_format", 0), where)
        scb = tensors.get("SCB")
        if scb is None:
            raise DamagedFileError(f"{where}: the checkpoint has the int8 weight but no SCB (its per-row scales), so it "
                             "cannot be dequantized; the file is damaged or was written without them")
        if tuple(scb.shape) != (codes.shape[0],) or not scb.is_floating_point():
            raise DamagedFileError(f"{where}: SCB must be float [{codes.shape[0]}] (one absmax per output row of the "
                             f"{list(codes.shape)} weight), got {scb.dtype} {list(scb.shape)}; the file is garbled")
        scb = scb.float()
        if not bool(torch.isfinite(scb).all()) or bool((scb < 0).any()):
            raise DamagedFileError(f"{where}: SCB holds negative, NaN or infinite scales; an absmax is finite and >= 0, "
                             "so the file is garbled")
        unknown = set(tensors) - {"weight", "SCB", "weight_format"}
        if unknown:
            raise DamagedFileError(f"{where}: unexpected 8-bit checkpoint entries {sorted(unknown)} (expected weight, SCB, "
                             "weight_format); this is not an LLM.int8 layer")
        return cls(codes=codes.to(device), scb=scb.to(device), shape=codes.shape, dtype=torch.float16,
                   threshold=threshold)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        # weight_format 0 = "row": what bitsandbytes >= 0.45 writes and the only layout it reads back.
        return {"weight": self.codes, "SCB": self.scb,
                "weight_format": torch.zeros((), dtype=torch.uint8, device=self.codes.device)}

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if dtype == torch.float64:  # fp32 products widened: exact
            return int8_ops.int8_dequantize(self.codes, self.scb, torch.float32).double()
        return int8_ops.int8_dequantize(self.codes, self.scb, dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return int8_ops.linear_int8(x, self.codes, self.scb, bias, self.threshold)
