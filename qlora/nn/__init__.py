"""Modules: the frozen quantized linear layer (any registered format) and its 4-bit form."""
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.quantized import QuantizedLinear

__all__ = ["Linear4bit", "QuantizedLinear"]
