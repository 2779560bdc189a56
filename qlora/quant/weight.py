"""QuantizedWeight: one frozen [out, in] weight in a quantized format, behind one interface.

The layer (qlora.nn.QuantizedLinear), the LoRA glue, the trainer and export see only this
interface; a format is a subclass registered by name (`register_format`) with its own quantizer,
kernels and checkpoint form. After torchao's NF4Tensor: explicit fields, a table of the torch ops it
supports (`F.linear`, `torch.Tensor.to`-style moves through `.to()`), and a NotImplementedError
naming any other op, instead of a silent wrong answer from a tensor of packed bytes.

Why a plain object held by the module, not a tensor subclass. FSDP2 (`fully_shard`) shards the
module's *parameters* along dim 0 and all-gathers them in their own dtype; it casts only float
parameters to the mixed-precision dtype. A format therefore names one tensor, `data_name` (the packed
bytes), that the layer registers as its `weight` Parameter: sharded along dim 0 by FSDP2 like any
parameter, and all-gathered byte for byte when held as uint8. The rest of the state (scales, code
books) is small and registered as buffers, which FSDP2 replicates. The layer rebuilds the weight
object from its current parameter and buffers on every access, so whatever FSDP2 or a device move
put there is what the kernels see. A tensor subclass would need fsdp_pre/post_all_gather hooks to
carry the same state, and every torch op on it to be listed before anything works.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping, Optional

import torch
import torch.nn.functional as F

_FORMATS: dict[str, type["QuantizedWeight"]] = {}


def register_format(*names: str):
    """Class decorator: make a QuantizedWeight subclass loadable by format name (e.g. "nf4", "fp4")."""

    def register(cls: type["QuantizedWeight"]) -> type["QuantizedWeight"]:
        for name in names:
            if name in _FORMATS and _FORMATS[name] is not cls:
                raise ValueError(f"quantized format {name!r} is already registered by {_FORMATS[name].__name__}")
            _FORMATS[name] = cls
        cls.format_names = names
        return cls

    return register


def get_format(name: str) -> type["QuantizedWeight"]:
    if name not in _FORMATS:
        raise ValueError(f"unknown quantized format {name!r}; registered formats: {sorted(_FORMATS)}")
    return _FORMATS[name]


def registered_formats() -> list[str]:
    return sorted(_FORMATS)


class QuantizedWeight(abc.ABC):
    """A frozen weight W of `shape` [out, in], quantized; `dtype` is the dtype W had before.

    Subclasses are dataclasses whose tensor fields are the whole state (`tensors()`), with
    `data_name` naming the one the layer holds as its Parameter (sharded along dim 0).
    """

    data_name: ClassVar[str] = "packed"
    shape: torch.Size
    dtype: torch.dtype

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def quantize(cls, weight: torch.Tensor, **options: Any) -> "QuantizedWeight":
        """Quantize a dense [out, in] weight (on its device)."""

    @classmethod
    @abc.abstractmethod
    def placeholder(cls, out_features: int, in_features: int, device: torch.device | str | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16, **options: Any) -> "QuantizedWeight":
        """Uninitialised tensors of the right sizes (on the meta device while a model skeleton is
        built, so that its memory footprint is already the quantized one)."""

    @classmethod
    @abc.abstractmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                        where: str = "") -> "QuantizedWeight":
        """Rebuild from `checkpoint_tensors()`'s form (a layer's entries, the bias left out);
        `where` names the layer in errors."""

    @abc.abstractmethod
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The incumbent's checkpoint entries of one layer, keyed relative to the layer's prefix
        ("weight", "weight.absmax", ... for bitsandbytes; "qweight", "scales", ... for GPTQ), bias
        excluded. The entry that holds `data` is the one under `data_key`."""

    data_key: ClassVar[str] = "weight"

    # ---- the operations ------------------------------------------------------------------------
    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [out, in] weight in `dtype`, through the format's dispatching op."""

    @abc.abstractmethod
    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., in] @ W^T + bias in x's dtype; differentiable in x and bias (dX = dY W, no dW)."""

    # ---- the tensors -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Optional[torch.Tensor]]:
        """Every tensor field by name (None where the format's options leave one out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor) or f.metadata.get("tensor")}

    def replace(self, **tensors: Optional[torch.Tensor]) -> "QuantizedWeight":
        """The same weight with some tensors swapped (a move, a shard, a parameter FSDP2 gathered)."""
        return dataclasses.replace(self, **tensors)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight on `device`; nothing is re-quantized, no dtype changes."""
        return self.replace(**{k: None if t is None else t.to(device) for k, t in self.tensors().items()})

    @property
    def data(self) -> torch.Tensor:
        return getattr(self, self.data_name)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held, every tensor of the state included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)

    # ---- the op table ------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if isinstance(weight, QuantizedWeight) and not isinstance(x, QuantizedWeight):
                return weight.linear(x, bias)
        name = getattr(func, "__name__", repr(func))
        raise NotImplementedError(
            f"{cls.__name__} supports F.linear(x, weight, bias), .dequantize(dtype) and .to(device); "
            f"torch op {name!r} is not defined on a quantized weight: call .dequantize(dtype) first"
        )
