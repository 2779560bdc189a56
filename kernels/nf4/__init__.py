"""NF4/FP4 kernels (bitsandbytes' blocked 4-bit layout, double-quantized scales): `packed.Packed4bit`
(the weight as every kernel takes it), `format` (blocksizes, storage dtypes), `reference` (the
PyTorch twins), the Triton kernels `dequantize`, `matmul` (fused) and `gemv` (decode), `ops` (the
custom ops and the dispatch rule, reading `dispatch_table.json`), `linear` (autograd) and
`selfcheck`."""
