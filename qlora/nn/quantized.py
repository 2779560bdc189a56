"""QuantizedLinear: a frozen linear layer whose weight is a QuantizedWeight of any registered format.

The layer holds the format's data tensor as its `weight` Parameter (frozen; FSDP2 shards it along
dim 0) and the rest of the state as non-persistent buffers named like the format's fields (they
follow the module across devices; the state_dict writes them in the format's own checkpoint keys,
such as bitsandbytes' "weight.absmax", which buffer names cannot carry because of the dot). The
QuantizedWeight is rebuilt from those tensors on each access, so a device move or an FSDP2 gather
is what the kernels see. Subclasses (Linear4bit) add the format's constructor and helpers; the
forward, dequantize, device moves and the state_dict are here, once for every format.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from qlora.quant.weight import QuantizedWeight, get_format

_LAYERS: dict[type[QuantizedWeight], type["QuantizedLinear"]] = {}


def layer_class(format_name: str) -> type["QuantizedLinear"]:
    """The layer class for a registered format (its QuantizedLinear subclass, or the generic one)."""
    return _LAYERS.get(get_format(format_name), QuantizedLinear)


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W).T + b in `compute_dtype`; W frozen, gradients flow to x (and b).

    `QuantizedLinear(in, out, bias, format="nf4", compute_dtype=..., **options)` builds a placeholder
    of that format (options are the format's quantize options), filled by `set_weight` (quantize a
    dense weight) or by loading a state_dict. A subclass may serve one weight type (`weight_class`):
    it is then the layer `layer_class(format)` returns.
    """

    weight_class: ClassVar[Optional[type[QuantizedWeight]]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.weight_class is not None:
            _LAYERS[cls.weight_class] = cls

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: Optional[str] = None,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 **options: Any):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_parameter("weight", None)  # first in the parameter order, as in nn.Linear; hold() fills it
        self._template: Optional[QuantizedWeight] = None
        self._state_names: tuple[str, ...] = ()
        self.quantize_options = dict(options)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None
        weight_class = self.weight_class if format is None else get_format(format)
        if weight_class is not None:
            self.hold(weight_class.placeholder(out_features, in_features, device, compute_dtype, **options))

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "QuantizedLinear":
        """A layer around an already quantized weight of any registered format."""
        out_features, in_features = weight.shape
        layer = QuantizedLinear(in_features, out_features, bias is not None, compute_dtype=compute_dtype,
                                device=weight.device)
        layer.hold(weight, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: Optional[str] = None, **options) -> "QuantizedLinear":
        """Quantize an nn.Linear; `options` are the constructor's keywords (compute_dtype, the format's)."""
        extra = {} if format is None else {"format": format}
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, **extra, **options)
        layer.set_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())
        return layer

    def set_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Quantize a dense [out, in] weight into this layer (on the weight's device), in its format."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"{type(self).__name__} needs a 2-D [out_features, in_features] weight, got {got}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match the layer "
                f"[out_features={self.out_features}, in_features={self.in_features}]"
            )
        self.hold(type(self._template).quantize(weight, **self.current_options()), bias)

    def quant_config(self, skip_modules=None):
        """The registered quantization config (qlora.quant.nf4.config) that describes this layer's format in
        config.json; the format's layer class defines it."""
        raise NotImplementedError(f"{type(self).__name__} holding {type(self._template).__name__} has no config.json "
                                  "form; register a QuantizedLinear subclass for the format that defines quant_config")

    def checkpoint_options(self) -> dict:
        """Keywords for the weight type's from_checkpoint that the checkpoint tensors do not carry
        (none for most formats; GPTQ's zero convention)."""
        return {}

    def current_options(self) -> dict:
        """The quantize options that reproduce the held weight's layout (the constructor's by default)."""
        return dict(self.quantize_options)

    # ---- the weight ----------------------------------------------------------------------------
    def hold(self, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> None:
        """Take `weight` as it is (no re-quantization) and, if given, a new bias."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{type(self).__name__}: quant_state shape {list(weight.shape)} does not match the layer "
                             f"[{self.out_features}, {self.in_features}]")
        for name in self._state_names:
            self._buffers.pop(name, None)
        tensors = weight.tensors()
        self.weight = nn.Parameter(tensors.pop(weight.data_name), requires_grad=False)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)
        self._state_names = tuple(tensors)
        self._template = weight
        if bias is not None:
            if self.bias is None or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"{type(self).__name__}: bias of shape {tuple(bias.shape)} does not fit a layer with "
                                 f"{'no bias' if self.bias is None else f'{self.out_features} outputs'}")
            self.bias = nn.Parameter(bias.to(self.weight.device, self.compute_dtype), requires_grad=False)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The weight as the format's type, built on the layer's current tensors."""
        current = {name: self._buffers[name] for name in self._state_names}
        current[self._template.data_name] = self.weight
        return self._template.replace(**current)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight this layer computes with (default: compute_dtype), through the
        format's dispatching op (the Triton kernel on a GPU)."""
        return self.quantized_weight.dequantize(dtype or self.compute_dtype)

    # ---- nn.Module ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return self.quantized_weight.linear(x.to(self.compute_dtype), bias).to(input_dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the packed bytes and fp32 scales and corrupt them:
        # only the device of fn is taken for those. The bias follows fn like any parameter.
        device = fn(torch.empty(0, device=self.weight.device)).device
        # New Parameter objects, as Module._apply makes: .data cannot move a tensor off meta.
        self.weight = nn.Parameter(_to_device(self.weight.data, device), requires_grad=False)
        for name in self._state_names:
            tensor = self._buffers[name]
            if tensor is not None:
                self._buffers[name] = _to_device(tensor, device)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=self.bias.requires_grad)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.quantized_weight
        for key, tensor in weight.checkpoint_tensors().items():
            if tensor is weight.data:  # the Parameter itself, so that keep_vars returns it
                tensor = self.weight if keep_vars else self.weight.detach()
            destination[prefix + key] = tensor
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight_class = type(self._template)
        data_key = prefix + weight_class.data_key
        if data_key not in state_dict:
            missing_keys.append(data_key)
            return
        # A layer has no submodules: every key under its prefix but the bias is the weight's.
        tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k != prefix + "bias"}
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is None:
            missing_keys.append(prefix + "bias")
        try:
            self.hold(weight_class.from_checkpoint(tensors, device=self.weight.device, where=data_key,
                                                   **self.checkpoint_options()), bias)
        except ValueError as err:
            error_msgs.append(str(err))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    if tensor.is_meta:  # to_empty(): allocate, there is nothing to copy
        return torch.empty_like(tensor, device=device)
    return tensor.to(device)
