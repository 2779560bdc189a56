"""NF4/FP4 (bitsandbytes' 4-bit layout, bit for bit): `codes` (the code books), `quantize` (the
blockwise quantizer), `state` (QuantState and its serialized quant_state), `weight` (Weight4bit, the
registered formats "nf4" and "fp4") and `config` (QuantConfig, BitsAndBytesConfig's 4-bit half)."""
from qlora.quant.nf4.config import QuantConfig
from qlora.quant.nf4.weight import Weight4bit

__all__ = ["QuantConfig", "Weight4bit"]
