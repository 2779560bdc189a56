"""LLM.int8 (bitsandbytes' 8-bit layout, as transformers saves it): `weight` (Weight8bit, the
registered format "int8", and its quantizer) and `config` (Int8Config, BitsAndBytesConfig's 8-bit
half)."""
from qlora.quant.int8.config import Int8Config
from qlora.quant.int8.weight import Weight8bit

__all__ = ["Int8Config", "Weight8bit"]
