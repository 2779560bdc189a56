"""Linear4bit: a frozen linear layer whose weight is held packed in the bitsandbytes 4-bit format."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qlora.kernels import linear_4bit, reference
from qlora.quant import NESTED_BLOCKSIZE, QuantState, quantize_4bit
from qlora.quant.codes import get_4bit_code
from qlora.quant.quantize import check_blocksize, check_quant_type, check_storage_dtype

# Non-persistent buffers: they follow the module across devices, and _save_to_state_dict writes
# them under bitsandbytes' key names ("weight.absmax", ...), which buffers cannot carry (dots).
_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")


class Linear4bit(nn.Module):
    """y = x @ dequant(W).T + b in `compute_dtype`; W frozen, gradients flow to x (and b).

    `weight` is a frozen Parameter holding the packed bytes (shape ((out*in + 1)//2, 1) in uint8,
    or the same bytes reinterpreted as `quant_storage`). Its state_dict is bitsandbytes' serialized
    form, so checkpoints load in transformers + bitsandbytes and the other way round.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        check_storage_dtype(quant_storage)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = compute_dtype  # the dtype the weight had before quantization
        self.nested_blocksize = NESTED_BLOCKSIZE
        # Placeholder state of the right sizes, so that a skeleton built on the meta device has
        # the layer's true memory footprint; loading or set_weight() fills it.
        n = in_features * out_features
        blocks = -(-n // blocksize)
        storage_bytes = torch.empty(0, dtype=quant_storage).element_size()
        packed = torch.empty(-(-((n + 1) // 2) // storage_bytes), 1, dtype=quant_storage, device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("quant_map", get_4bit_code(quant_type, "cpu").to(device), persistent=False)
        if double_quant:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device), persistent=False)
            self.register_buffer("nested_absmax", torch.empty(-(-blocks // NESTED_BLOCKSIZE), device=device), persistent=False)
            self.register_buffer("nested_quant_map", torch.empty(256, device=device), persistent=False)
            self.register_buffer("nested_offset", torch.empty((), device=device), persistent=False)
        else:
            self.register_buffer("absmax", torch.empty(blocks, device=device), persistent=False)
            for name in _STATE_BUFFERS[2:]:
                self.register_buffer(name, None, persistent=False)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "Linear4bit":
        """Quantize an nn.Linear; `options` are the constructor's quantization keywords."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, **options)
        layer.set_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())
        return layer

    def set_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Quantize a dense [out, in] weight into this layer (on the weight's device)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"Linear4bit needs a 2-D [out_features, in_features] weight, got {got}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match the layer "
                f"[out_features={self.out_features}, in_features={self.in_features}]"
            )
        packed, state = quantize_4bit(
            weight, self.quant_type, self.blocksize, self.double_quant, quant_storage=self.weight.dtype
        )
        self.set_quantized(packed, state, bias)

    def set_quantized(self, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None) -> None:
        """Take an already packed weight and its state as they are (no re-quantization)."""
        where = "Linear4bit"
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{where}: quant_state shape {list(state.shape)} does not match the layer "
                             f"[{self.out_features}, {self.in_features}]")
        expected_bytes = (state.numel + 1) // 2
        got_bytes = packed.numel() * packed.element_size()
        if got_bytes != expected_bytes:
            raise ValueError(f"{where}: packed weight has {got_bytes} bytes, shape {list(state.shape)} needs {expected_bytes}")
        # A checkpoint's own layout wins over the one the skeleton was built with.
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.double_quant
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.weight_dtype = state.dtype
        self.nested_blocksize = state.nested_blocksize
        self.absmax, self.quant_map = state.absmax, state.code
        self.nested_absmax, self.nested_quant_map, self.nested_offset = state.nested_absmax, state.nested_code, state.offset
        if bias is not None:
            if self.bias is None or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"{where}: bias of shape {tuple(bias.shape)} does not fit a layer with "
                                 f"{'no bias' if self.bias is None else f'{self.out_features} outputs'}")
            self.bias = nn.Parameter(bias.to(self.weight.device, self.compute_dtype), requires_grad=False)

    # ---- the state --------------------------------------------------------------------------
    @property
    def quant_state(self) -> QuantState:
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            code=self.quant_map,
            quant_type=self.quant_type,
            offset=self.nested_offset,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_quant_map,
            nested_blocksize=self.nested_blocksize,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight this layer computes with (default: compute_dtype)."""
        return reference.dequantize_4bit(self.weight, dtype=dtype or self.compute_dtype, **self.quant_state.kernel_args())

    # ---- nn.Module ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = linear_4bit(x.to(self.compute_dtype), self.weight, bias=bias, **self.quant_state.kernel_args())
        return out.to(input_dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the packed bytes and fp32 scales and corrupt them:
        # only the device of fn is taken for those. The bias follows fn like any parameter.
        device = fn(torch.empty(0, device=self.weight.device)).device
        # New Parameter objects, as Module._apply makes: .data cannot move a tensor off meta.
        self.weight = nn.Parameter(_to_device(self.weight.data, device), requires_grad=False)
        for name in _STATE_BUFFERS:
            tensor = getattr(self, name)
            if tensor is not None:
                self._buffers[name] = _to_device(tensor, device)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=self.bias.requires_grad)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for key, tensor in self.quant_state.as_dict().items():
            destination[f"{prefix}weight.{key}"] = tensor
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight_key = prefix + "weight"
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
            return
        state_tensors = {k[len(weight_key) + 1:]: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is None:
            missing_keys.append(prefix + "bias")
        try:
            state = QuantState.from_dict(state_tensors, device=self.weight.device, where=weight_key)
            self.set_quantized(state_dict[weight_key].to(self.weight.device), state, bias)
        except ValueError as err:
            error_msgs.append(str(err))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    if tensor.is_meta:  # to_empty(): allocate, there is nothing to copy
        return torch.empty_like(tensor, device=device)
    return tensor.to(device)
