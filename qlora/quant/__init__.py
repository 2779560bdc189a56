"""Quantized formats behind one interface (QuantizedWeight, registered by name), and the
bitsandbytes-compatible NF4/FP4 format: code books, quantizer, QuantState, Weight4bit."""
from qlora.quant.codes import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, dynamic_map, get_4bit_code
from qlora.quant.quantize import dequantize_4bit, quantize_4bit
from qlora.quant.state import QuantState
from qlora.quant.weight import QuantizedWeight, get_format, register_format, registered_formats
from qlora.quant.weight4bit import Weight4bit

__all__ = [
    "ALLOWED_BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "QuantState", "QuantizedWeight", "Weight4bit",
    "dequantize_4bit", "dynamic_map", "get_4bit_code", "get_format", "quantize_4bit", "register_format",
    "registered_formats",
]
