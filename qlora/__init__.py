"""qlora: QLoRA fine-tuning with bitsandbytes-compatible 4-bit and 8-bit weights, without bitsandbytes."""
from qlora import hub
from qlora.quant.nf4.config import QuantConfig
from qlora.hub import push_to_hub
from qlora.memory import memory_footprint
from qlora.models import load_model, save_model
from qlora.nn import Linear4bit, Linear8bit, QuantizedLinear
from qlora.nn.linear_gptq import LinearGPTQ
from qlora.quant.gptq.config import GPTQQuantConfig
from qlora.quant.gptq.weight import GPTQWeight
from qlora.quant import QuantizedWeight, QuantState, Weight4bit, dequantize_4bit, quantize_4bit
from qlora.quant.int8.weight import Weight8bit, int8_vectorwise_quant
from qlora.quant.int8.config import Int8Config

__version__ = "0.1.0"

__all__ = [
    "GPTQQuantConfig", "GPTQWeight", "Int8Config", "Linear4bit", "Linear8bit", "LinearGPTQ", "QuantConfig",
    "QuantState", "QuantizedLinear", "QuantizedWeight", "Weight4bit", "Weight8bit", "dequantize_4bit",
    "int8_vectorwise_quant", "load_model", "memory_footprint", "push_to_hub", "quantize_4bit", "save_model",
]
