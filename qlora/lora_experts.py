"""LoRA on 4-bit expert stacks, through PEFT's own mechanism for 3-D parameters.

PEFT adapts an `nn.Parameter` named in `LoraConfig.target_parameters` with `lora.ParamWrapper`: per
expert e, lora_A [E*r, in] and lora_B [out, E*r] hold A_e and B_e, and during the forward the
parameter is parametrized as W + scaling * B_e A_e. That sum needs a dense W; here W is packed bytes.
The subclass below keeps PEFT's wrapper whole (its parameters, names, init, saving, adapter_config)
and changes one step: instead of parametrizing the weight, it hands the factors to qlora's experts
implementation for the duration of the forward, which adds scaling * (x_e A_e^T) B_e^T per expert
next to the 4-bit product. The adapter is therefore a plain PEFT adapter: `PeftModel.from_pretrained`
loads it on the bf16 model, where stock ParamWrapper applies the same A_e, B_e.

It is registered through PEFT's dynamic dispatch (`LoraConfig._register_custom_module`), keyed by
the model's own experts classes, like LoraQuantizedLinear is for QuantizedLinear.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from peft.tuners.lora.layer import ParamWrapper as PeftParamWrapper
from torch import nn

from qlora.nn.experts import held_experts, is_experts_module, logical_shape, quantized_stacks
from qlora.nn.expert_projection import active_lora

log = logging.getLogger(__name__)
_MERGE_ERROR = ("merging a LoRA adapter into 4-bit expert stacks is not supported (re-quantizing W + BA adds a "
                "second rounding error); keep the adapter separate, or use qlora's export, which merges in fp32")


class ParamWrapper(PeftParamWrapper):
    """PEFT's ParamWrapper around a 4-bit expert stack.

    The class keeps PEFT's name: PEFT recognises an existing wrapper (to nest the second targeted
    parameter of the same experts module in it) by the class name "ParamWrapper".
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # The held Parameter is [E, bytes]; PEFT reads in/out from the dense shape in the module's
        # own layout ([E, out, in], or [E, in, out] where is_transposed), which is what it would see on bf16.
        e, out_features, in_features = logical_shape(self.get_base_layer(), self.parameter_name)
        self.num_experts, self._param_ndim = e, 3
        if _flipped(self.get_base_layer()):  # PEFT's roles for it are ([E, in, out] read as) in=out, out=in
            return out_features, in_features
        if getattr(self.get_base_layer(), "is_transposed", False):
            return in_features, out_features
        return out_features, in_features  # PEFT swaps them back in update_layer, as for a dense stack

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs) -> None:
        init = config.init_lora_weights
        if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
            raise NotImplementedError(f"init_lora_weights={init!r} reads the dense base weight, which is packed in "
                                      "4-bit expert stacks; use True, False or 'gaussian'")
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # A stack still on meta (distributed.low_memory_load fills it after FSDP2 has sharded it): PEFT moves
        # the freshly initialised adapter to meta too. Its values are kept here until qlora.distributed.low_memory
        # copies them into the shards, as LoraQuantizedLinear does (the packed stack is uint8: no dtype cast).
        if self.get_param().is_meta:
            pending = self.__dict__.setdefault("pending_adapter_values", {})
            pending.update({name: p.detach().clone() for name, p in self.named_parameters() if not p.is_meta})
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)

    def factors(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [E, r, in], B [E, out, r], scaling) of one adapter, in the [out, in] orientation of the stack."""
        weight_a = self.lora_A[adapter_name].weight
        weight_b = self.lora_B[adapter_name].weight
        a = weight_a.reshape(self.num_experts, -1, weight_a.shape[-1])
        b = weight_b.reshape(weight_b.shape[0], -1, self.num_experts).permute(2, 0, 1)
        if _flipped(self.get_base_layer()):  # PEFT's delta B A is on W^T: on W it is A^T B^T
            a, b = b.transpose(1, 2), a.transpose(1, 2)
        return a.to(dtype), b.to(dtype), self.scaling[adapter_name]

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        adapters = [a for a in active_adapters if a in self.lora_A]
        if not adapters:
            yield
            return
        base = self.get_base_layer()
        dtype = self.lora_A[adapters[0]].weight.dtype
        lora = active_lora(base)
        lora[self.parameter_name] = [self.factors(a, dtype) for a in adapters]
        try:
            yield
        finally:
            lora.pop(self.parameter_name, None)

    def get_delta_weight(self, adapter_name, *args, **kwargs) -> torch.Tensor:
        """scaling * B_e A_e for every expert, [E, out, in] ([E, in, out] where the module is transposed), fp32."""
        a, b, scaling = self.factors(adapter_name, torch.float32)
        delta = torch.bmm(b, a) * scaling
        return delta.transpose(1, 2) if getattr(self.get_base_layer(), "is_transposed", False) else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(_MERGE_ERROR)

    def unmerge(self) -> None:
        if self.merged:
            raise NotImplementedError(_MERGE_ERROR)


def _flipped(module: nn.Module) -> bool:
    """Stock PEFT reads this module's [E, in, out] stacks as [E, out, in] (qlora.nn.bmm_experts: the module it
    replaces, Llama-4's, has no is_transposed flag), so its lora_A spans the stack's outputs and lora_B its
    inputs. The adapter keeps PEFT's layout, so that it loads on the 16-bit model; the compute flips it."""
    return getattr(module, "peft_reads_as_out_in", False)


def expert_target_parameters(model: nn.Module) -> list[str]:
    """The names LoraConfig.target_parameters needs for every expert stack of `model`, quantized or 16-bit
    ("experts.gate_up_proj", ...: the module's last name and the parameter, which PEFT matches as a suffix)."""
    names = []
    for module_name, module in model.named_modules():
        if is_experts_module(module):
            leaf = module_name.removesuffix(".base_layer").rsplit(".", 1)[-1]
            for param in ("gate_up_proj", "up_proj", "down_proj"):
                tensor = getattr(module, param, None)
                if held_experts(module, param) is not None or (isinstance(tensor, torch.Tensor) and tensor.dim() == 3):
                    names.append(f"{leaf}.{param}")
    return list(dict.fromkeys(names))


def register_experts(config, model: Optional[nn.Module] = None):
    """Register ParamWrapper for the model's experts classes that hold 4-bit stacks (PEFT's dynamic dispatch);
    16-bit stacks (skip_modules) keep stock PEFT. Without a model: every experts class already quantized
    in a loaded model cannot be known, so the caller passes it."""
    if model is not None:
        classes = {type(module) for _, module, _ in quantized_stacks(model)}
        config._register_custom_module({cls: ParamWrapper for cls in classes})
    return config


def adapted_experts(model: nn.Module) -> tuple[int, int]:
    """(trainable LoRA parameters on expert stacks, number of stacks adapted)."""
    wrappers = [m for m in model.modules() if isinstance(m, PeftParamWrapper)]
    count = sum(p.numel() for w in wrappers for name, p in w.named_parameters(recurse=True)
                if p.requires_grad and "lora_" in name and ".base_layer." not in f".{name}")
    return count, len(wrappers)
