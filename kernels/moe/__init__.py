"""The grouped 4-bit kernels of mixture-of-experts layers (installed as qlora.kernels.moe): one frozen
NF4/FP4 linear per expert, all experts in one launch over tokens sorted by expert.

`packed.PackedExperts4bit` (the expert stack as every kernel takes it; `.expert(e)` is expert e as the
4-bit kernels' Packed4bit), `reference` (the PyTorch twin, through kernels/nf4's decode), `grouped`
(the Triton kernel and its launcher), `ops` (the custom op, its dispatch, the autograd Function,
`grouped_linear_4bit` and `grouped_linear`, which takes any stack with the same fields) and
`selfcheck`. The Triton kernel module is imported on its first use."""
from qlora.kernels.moe.ops import grouped_linear, grouped_linear_4bit
from qlora.kernels.moe.packed import PackedExperts4bit, as_packed_experts

__all__ = ["PackedExperts4bit", "as_packed_experts", "grouped_linear", "grouped_linear_4bit"]
