"""Quantized weight formats behind one interface: `QuantizedWeight` (weight.py), registered by name,
and their configs, registered with `qlora.quant.config`. The registries are the only point the
formats share: each format is a folder here (`nf4/` NF4/FP4, `int8/` LLM.int8, `gptq/` GPTQ) with its
config, weight type, quantizer and checkpoint form, and its kernels in `qlora.kernels.<format>`.
Importing this package imports every format folder, so adding a format is adding a folder.

The NF4/FP4 names (QLoRA's default format) are also kept here: QuantState, Weight4bit,
quantize_4bit, dequantize_4bit, the code books.
"""
import importlib
import pkgutil

from qlora.quant.config import quant_config_from_any, register_quant_config
from qlora.quant.nf4.codes import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, dynamic_map, get_4bit_code
from qlora.quant.nf4.quantize import dequantize_4bit, quantize_4bit
from qlora.quant.nf4.state import QuantState
from qlora.quant.nf4.weight import Weight4bit
from qlora.quant.weight import QuantizedWeight, get_format, register_format, registered_formats

for _format in pkgutil.iter_modules(__path__):
    if _format.ispkg:
        importlib.import_module(f"{__name__}.{_format.name}")

__all__ = [
    "ALLOWED_BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "QuantState", "QuantizedWeight", "Weight4bit",
    "dequantize_4bit", "dynamic_map", "get_4bit_code", "get_format", "quant_config_from_any", "quantize_4bit",
    "register_format", "register_quant_config", "registered_formats",
]
