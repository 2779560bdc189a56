"""The bitsandbytes-compatible NF4/FP4 format: code books, quantizer, QuantState."""
from qlora.quant.codes import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, dynamic_map, get_4bit_code
from qlora.quant.quantize import dequantize_4bit, quantize_4bit
from qlora.quant.state import QuantState

__all__ = [
    "ALLOWED_BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "QuantState",
    "dequantize_4bit", "dynamic_map", "get_4bit_code", "quantize_4bit",
]
