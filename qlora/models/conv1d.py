"""transformers' `Conv1D` (GPT-2 and its kin) quantized as a linear layer, the way transformers +
bitsandbytes does it.

Conv1D computes x @ W + b with W stored [in, out] (`nx`, `nf`): the transpose of nn.Linear's [out, in].
bitsandbytes' transformers integration swaps it for a Linear4bit / Linear8bitLt with
in_features, out_features = W.shape and quantizes W.T, so a bnb checkpoint of gpt2 holds exactly
what it holds for an nn.Linear: the packed [out, in] matrix, quant_state "shape": [out, in] (LLM.int8:
int8 [out, in], SCB [out]). qlora does the same: the 16-bit checkpoint tensor is transposed once while
streaming, before it is quantized; packed checkpoints load as they are, and what we save is those
bytes (bit for bit what transformers + bitsandbytes writes for the same weights).

LoRA: the swapped layer is a QuantizedLinear, so PEFT wraps it like any other (fan_in_fan_out=False).
Its lora_A [r, in] and lora_B [out, r] are the very tensors PEFT gives a Conv1D (there PEFT sets
fan_in_fan_out=True itself, which only changes how a merge lays out B @ A), so the adapter loads on
the 16-bit gpt2 with stock PeftModel.from_pretrained.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Set on a QuantizedLinear that replaced a Conv1D: its checkpoint's 16-bit weight is [in, out].
TRANSPOSED_ATTRIBUTE = "checkpoint_weight_transposed"


def linear_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of a module qlora quantizes as a linear layer (nn.Linear or
    transformers' Conv1D), None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape  # [nx, nf], as bitsandbytes reads it
        return in_features, out_features
    return None


def mark_source(layer: nn.Module, source: nn.Module) -> nn.Module:
    """Record on the quantized `layer` whether the module it replaced stored its weight transposed."""
    setattr(layer, TRANSPOSED_ATTRIBUTE, isinstance(source, Conv1D))
    return layer


def is_transposed(layer: nn.Module) -> bool:
    """Whether the checkpoint's 16-bit weight of this quantized layer is [in, out] (it replaced a Conv1D)."""
    return bool(getattr(layer, TRANSPOSED_ATTRIBUTE, False))


def as_out_in(layer: nn.Module, checkpoint_weight: torch.Tensor) -> torch.Tensor:
    """The checkpoint's 16-bit weight of `layer` as the [out, in] matrix that gets quantized."""
    return checkpoint_weight.t().contiguous() if is_transposed(layer) else checkpoint_weight


def as_checkpoint_layout(layer: nn.Module, out_in_weight: torch.Tensor) -> torch.Tensor:
    """A dense [out, in] weight of `layer` in the 16-bit checkpoint's layout (export writes this)."""
    return out_in_weight.t().contiguous() if is_transposed(layer) else out_in_weight


def checkpoint_shape(layer: nn.Module) -> tuple[int, int]:
    """The shape of `layer`'s 16-bit weight in its checkpoint: [out, in], or [in, out] after a Conv1D."""
    return (layer.in_features, layer.out_features) if is_transposed(layer) else (layer.out_features, layer.in_features)
