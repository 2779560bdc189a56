"""GPTQ kernels (the AutoGPTQ/GPTQModel v1 layout, 2/3/4/8 bits): `format` (PackedGPTQ and the bit
packing), `reference` (the PyTorch twins), `triton` (dequantize and the fused products), `ops` (the
custom ops, the autograd Function and the dispatch rule, reading `dispatch_table.json`)."""
