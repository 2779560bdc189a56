"""qlora: QLoRA fine-tuning with bitsandbytes-compatible 4-bit weights, without bitsandbytes."""
from qlora.config import QuantConfig
from qlora.memory import memory_footprint
from qlora.models import load_model, save_model
from qlora.nn import Linear4bit, QuantizedLinear
from qlora.nn.linear_gptq import LinearGPTQ
from qlora.quant.gptq_config import GPTQQuantConfig
from qlora.quant.gptq_weight import GPTQWeight
from qlora.quant import QuantizedWeight, QuantState, Weight4bit, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = [
    "GPTQQuantConfig", "GPTQWeight", "Linear4bit", "LinearGPTQ", "QuantConfig", "QuantState", "QuantizedLinear", "QuantizedWeight", "Weight4bit", "dequantize_4bit",
    "load_model", "memory_footprint", "quantize_4bit", "save_model",
]
