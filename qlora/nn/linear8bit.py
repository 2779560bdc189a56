"""Linear8bit: a frozen linear layer whose weight is held in LLM.int8 (bitsandbytes' 8-bit format)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from qlora.nn.quantized import QuantizedLinear
from qlora.quant.int8.weight import DEFAULT_THRESHOLD, Weight8bit, check_threshold
from qlora.quant.int8.config import Int8Config


class Linear8bit(QuantizedLinear):
    """y = LLM.int8(x, W) + b in `compute_dtype`; W frozen as int8 codes + per-row SCB, gradients flow
    to x (and b). `weight` is the int8 [out, in] Parameter, `scb` a buffer; the state_dict is
    bitsandbytes' (weight, SCB, weight_format), so transformers + bitsandbytes loads it and back.

    threshold: the outlier threshold of the forward (the layer's, not the checkpoint's: bitsandbytes
    does not store it per layer either; it comes from llm_int8_threshold)."""

    weight_class = Weight8bit

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: Optional[str] = None,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 threshold: float = DEFAULT_THRESHOLD):
        if format not in (None, "int8"):
            raise ValueError(f"Linear8bit holds format 'int8', not {format!r}")
        self.threshold = check_threshold(threshold, "threshold")
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, device=device,
                         threshold=self.threshold)

    def hold(self, weight: Weight8bit, bias: Optional[torch.Tensor] = None) -> None:
        # A checkpoint carries no threshold: the layer's (from the config) is the one the forward uses.
        if isinstance(weight, Weight8bit) and weight.threshold != getattr(self, "threshold", weight.threshold):
            weight = dataclasses.replace(weight, threshold=self.threshold)
        super().hold(weight, bias)

    def current_options(self) -> dict:
        return dict(threshold=self.threshold)

    def quant_config(self, skip_modules=None) -> Int8Config:
        return Int8Config(threshold=self.threshold, compute_dtype=self.compute_dtype, skip_modules=skip_modules)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format=int8, threshold={self.threshold}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")
