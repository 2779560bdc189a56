"""The fused 8-bit AdamW step (the optimizer's kernel, not a weight format): `ops.adamw8bit_update_`
is the op, `reference` its PyTorch twin, `adamw8bit` the Triton kernel (imported on first GPU use)."""
from qlora.kernels.optim.checks import AdamW8bitHyper, AdamW8bitTensors
from qlora.kernels.optim.ops import adamw8bit_update_

__all__ = ["AdamW8bitHyper", "AdamW8bitTensors", "adamw8bit_update_"]
