"""Modules: the frozen quantized linear layer (any registered format), its 4-bit and its 8-bit (LLM.int8) forms."""
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.linear8bit import Linear8bit
from qlora.nn.quantized import QuantizedLinear

__all__ = ["Linear4bit", "Linear8bit", "QuantizedLinear"]
