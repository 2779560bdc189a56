"""MXFP4 (OCP microscaling FP4): the format gpt-oss publishes its experts in. Held as it is, never
re-quantized (experts.py says why)."""
from qlora.quant.mxfp4.experts import ExpertWeightMXFP4, dequantize_mxfp4, quantize_mxfp4

__all__ = ["ExpertWeightMXFP4", "dequantize_mxfp4", "quantize_mxfp4"]
