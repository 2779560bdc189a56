"""Weight4bit: the NF4/FP4 format (bitsandbytes' layout, bit for bit) as a QuantizedWeight.

Its state is QuantState's fields (one vocabulary: absmax, code, nested_absmax, nested_code, offset,
blocksize, nested_blocksize, shape, dtype, quant_type) plus the packed bytes. The kernels take it
as a `Packed4bit` (`kernel_view()`), flattened into arguments only at the custom ops.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from qlora.kernels import linear_4bit
from qlora.kernels.nf4 import ops
from qlora.kernels.nf4.format import NESTED_BLOCKSIZE, check_blocksize, check_storage_dtype
from qlora.kernels.nf4.packed import Packed4bit
from qlora.quant.nf4.codes import dynamic_map, get_4bit_code
from qlora.quant.nf4.quantize import check_quant_type, quantize_4bit
from qlora.quant.nf4.state import QuantState
from qlora.quant.weight import QuantizedWeight, register_format


@register_format("nf4", "fp4")
@dataclasses.dataclass(kw_only=True)
class Weight4bit(QuantState, QuantizedWeight):
    """A 4-bit weight: `packed` ((numel + 1) // 2 bytes, any storage dtype) and its QuantState fields."""

    packed: torch.Tensor

    @classmethod
    def from_state(cls, packed: torch.Tensor, state: QuantState) -> "Weight4bit":
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(QuantState)}
        weight = cls(packed=packed.reshape(-1, 1), **fields)
        weight.check_packed(where="Weight4bit")
        return weight

    @property
    def state(self) -> QuantState:
        """The scales and layout without the packed bytes (bitsandbytes' QuantState)."""
        return QuantState(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QuantState)})

    def check_packed(self, where: str) -> None:
        expected = (self.numel + 1) // 2
        got = self.packed.numel() * self.packed.element_size()
        if got != expected:
            raise ValueError(f"{where}: packed weight has {got} bytes, shape {list(self.shape)} needs {expected}")

    # ---- QuantizedWeight -----------------------------------------------------------------------
    @classmethod
    def quantize(cls, weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 quant_storage: torch.dtype = torch.uint8) -> "Weight4bit":
        packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant, quant_storage)
        return cls.from_state(packed, state)

    @classmethod
    def placeholder(cls, out_features: int, in_features: int, device: torch.device | str | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, quant_storage: torch.dtype = torch.uint8) -> "Weight4bit":
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        check_storage_dtype(quant_storage)
        n = in_features * out_features
        blocks = -(-n // blocksize)
        storage_bytes = torch.empty(0, dtype=quant_storage).element_size()
        weight = cls(
            packed=torch.empty(-(-((n + 1) // 2) // storage_bytes), 1, dtype=quant_storage, device=device),
            absmax=torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device),
            shape=torch.Size((out_features, in_features)),
            dtype=compute_dtype,
            blocksize=blocksize,
            code=get_4bit_code(quant_type, "cpu").to(device),
            quant_type=quant_type,
        )
        if double_quant:
            weight.offset = torch.empty((), device=device)
            weight.nested_absmax = torch.empty(-(-blocks // NESTED_BLOCKSIZE), device=device)
            weight.nested_code = dynamic_map("cpu").to(device)
        return weight

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                        where: str = "") -> "Weight4bit":
        where = where or "4-bit weight"
        if "weight" not in tensors:
            raise ValueError(f"{where}: the packed weight itself is missing; the checkpoint is incomplete")
        state_tensors = {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}
        if not state_tensors:
            raise ValueError(f"{where}: the checkpoint says it is bitsandbytes-quantized but has no quant_state for "
                             "this weight; the file is damaged, or the layer should be in llm_int8_skip_modules")
        state = QuantState.from_dict(state_tensors, device=device, where=where)
        weight = cls.from_state(tensors["weight"].to(device), state)
        weight.check_packed(where)
        return weight

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.packed, **{f"weight.{k}": v for k, v in self.as_dict().items()}}

    def kernel_view(self) -> Packed4bit:
        return self.packed_view(self.packed)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if dtype == torch.float64:  # the decoded values are fp32 products: widening them is exact
            return ops.dequantize(self.kernel_view(), torch.float32).view(self.shape).double()
        return ops.dequantize(self.kernel_view(), dtype).view(self.shape)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear_4bit(x, self.kernel_view(), bias)
