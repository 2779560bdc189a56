"""The grouped 4-bit kernels of mixture-of-experts layers (installed as qlora.kernels.moe): one frozen
NF4/FP4 linear per expert, all experts in one launch over tokens sorted by expert.

`packed.PackedExperts4bit` (the expert stack as every kernel takes it; `.expert(e)` is expert e as the
4-bit kernels' Packed4bit), `reference` (the PyTorch twin, through kernels/nf4's decode), `grouped`
(the Triton kernel and its launcher), `ops` (the custom op, its dispatch, the autograd Function and
`grouped_linear_4bit`) and `selfcheck`."""
