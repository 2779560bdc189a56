"""Linear4bit: a frozen linear layer whose weight is held packed in the bitsandbytes 4-bit format."""
from __future__ import annotations

from typing import Optional

import torch

from qlora.quant.nf4.config import QuantConfig
from qlora.nn.quantized import QuantizedLinear
from qlora.quant import QuantState
from qlora.quant.nf4.weight import Weight4bit


class _HeldLayout:
    """A read-only attribute of the layer that is a field of its held weight's layout (the
    checkpoint's own once one is loaded, see set_quantized)."""

    def __init__(self, field: str):
        self.field = field

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, layer, owner=None):
        return self if layer is None else getattr(layer._template, self.field)

    def __set__(self, layer, value):
        raise AttributeError(f"Linear4bit.{self.name} is the held weight's layout; quantize again to change it")


class Linear4bit(QuantizedLinear):
    """y = x @ dequant(W).T + b in `compute_dtype`; W frozen in NF4/FP4, gradients flow to x (and b).

    `weight` is a frozen Parameter holding the packed bytes (shape ((out*in + 1)//2, 1) in uint8,
    or the same bytes reinterpreted as `quant_storage`); the scales are buffers named like
    QuantState's fields. Its state_dict is bitsandbytes' serialized form, so checkpoints load in
    transformers + bitsandbytes and the other way round.
    """

    weight_class = Weight4bit

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        format: Optional[str] = None,
    ):
        if format is not None and format != quant_type:
            quant_type = format  # the generic constructor names the 4-bit type by its format name
        # The skeleton's placeholder has the layer's true memory footprint; loading or set_weight fills it.
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, device=device,
                         quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                         quant_storage=quant_storage)

    @classmethod
    def from_linear(cls, linear, **options) -> "Linear4bit":
        """Quantize an nn.Linear; `options` are the constructor's quantization keywords."""
        return super().from_linear(linear, **options)

    def current_options(self) -> dict:
        # A checkpoint's own layout (set_quantized / load_state_dict) wins over the constructor's.
        return dict(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                    quant_storage=self.weight.dtype)

    def quant_config(self, skip_modules=None) -> QuantConfig:
        """The QuantConfig that describes this layer's format (for config.json)."""
        return QuantConfig(quant_type=self.quant_type, double_quant=self.double_quant, compute_dtype=self.compute_dtype,
                           blocksize=self.blocksize, quant_storage=self.weight.dtype, skip_modules=skip_modules)

    def set_quantized(self, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None) -> None:
        """Take an already packed weight and its state as they are (no re-quantization).

        A checkpoint's own layout (quant type, blocksize, double quant) wins over the skeleton's."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit: quant_state shape {list(state.shape)} does not match the layer "
                             f"[{self.out_features}, {self.in_features}]")
        self.hold(Weight4bit.from_state(packed, state), bias)

    # ---- the format's fields, read from the held weight --------------------------------------
    @property
    def quant_state(self) -> QuantState:
        return self.quantized_weight.state

    quant_type = _HeldLayout("quant_type")  # "nf4" | "fp4"
    blocksize = _HeldLayout("blocksize")
    double_quant = _HeldLayout("double_quant")
    nested_blocksize = _HeldLayout("nested_blocksize")
    weight_dtype = _HeldLayout("dtype")  # the dtype the weight had before quantization

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )

