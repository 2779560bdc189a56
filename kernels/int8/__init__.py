"""LLM.int8 kernels (bitsandbytes' 8-bit layout): `reference` (the quantizer, dequantizer and forward
with outlier decomposition in PyTorch), the Triton kernels `dequantize` and `matmul`, and `ops` (the
custom ops qlora::int8_dequantize and qlora::int8_linear)."""
