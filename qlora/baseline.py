"""The unquantized baseline (`quantization=none`): the base model in its own 16-bit weights, frozen.

Plain LoRA on a dense base is what QLoRA claims to match; holding the base in 16 bits with the
same targets, data and trainer isolates what the 4-bit format costs. The linear layers keep the
checkpoint's own values W (a bf16 checkpoint read into fp32 is exact: every bf16 is an fp32), so
an adapter trained here is merged into W itself.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from qlora.models.families import from_pretrained

NO_QUANTIZATION = "none"


class FrozenLinear(nn.Linear):
    """A frozen linear layer held in its compute dtype that, like the quantized layers, casts its input
    to that dtype and its output back to the input's. Without the casts a bf16 linear inside an fp32
    model (the default model.dtype on a CPU) fails on its first matmul. Still an nn.Linear: PEFT
    adapts and merges it as one, and its state dict is the checkpoint's (weight, bias)."""

    @classmethod
    def holding(cls, linear: nn.Linear) -> "FrozenLinear":
        """A FrozenLinear around `linear`'s own parameters (no copy)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def _is_kept_dense(name: str, skip_modules: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip_modules)


def load_dense_model(name_or_path: str | os.PathLike, compute_dtype: torch.dtype, dense_dtype: Optional[torch.dtype] = None,
                     device: torch.device | str = "cpu", skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
                     revision: Optional[str] = None, trust_remote_code: bool = False,
                     attn_implementation: Optional[str] = None) -> PreTrainedModel:
    """A causal LM with every target linear in `compute_dtype` and the rest in `dense_dtype`.

    The same split as qlora.load_model: the linears it would quantize (all but the output head
    and `skip_modules`) are held in the compute dtype instead of 4 bits; embeddings, norms and
    the head in `dense_dtype` (default: the compute dtype). Loaded with transformers' own loader.
    """
    dense_dtype = dense_dtype or compute_dtype
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = from_pretrained(name_or_path, dtype=dense_dtype, revision=revision, trust_remote_code=trust_remote_code,
                            **options)
    config = getattr(model.config, "quantization_config", None)
    if config is not None:
        raise ValueError(f"quantization=none needs a 16-bit checkpoint, but {name_or_path} is already quantized "
                         f"({getattr(config, 'quant_method', config)}); pass the unquantized checkpoint as "
                         "model.name_or_path, or pick a quantization (quantization=nf4)")
    head = model.get_output_embeddings()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head and not _is_kept_dense(name, list(skip_modules))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).set_submodule(child, FrozenLinear.holding(module.to(compute_dtype)))
    model.to(device)
    model.eval()
    return model
