"""qlora: QLoRA fine-tuning without bitsandbytes."""
from qlora.quant import QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"
