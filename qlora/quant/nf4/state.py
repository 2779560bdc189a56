"""QuantState: everything needed to dequantize one packed 4-bit tensor, and its serialized form.

The serialized form is bitsandbytes' (docs/formats.md, "NF4/FP4: the format"): per quantized weight, the tensors `absmax`,
`quant_map`, `nested_absmax`, `nested_quant_map` (the last two with double quantization) and
`quant_state.bitsandbytes__<type>`, the uint8 bytes of a JSON dict of the scalar fields.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Mapping, Optional

import torch

from qlora.kernels.nf4.format import NESTED_BLOCKSIZE, check_blocksize
from qlora.kernels.dtypes import dtype_name, parse_dtype
from qlora.kernels.nf4.packed import Packed4bit
from qlora.quant.nf4.codes import QUANT_TYPES

_STATE_KEY_PREFIX = "quant_state.bitsandbytes__"


@dataclasses.dataclass
class QuantState:
    """Scales and metadata of one packed 4-bit tensor.

    With double quantization `absmax` holds uint8 codes of (absmax - offset) in the nested 8-bit
    map, scaled per NESTED_BLOCKSIZE codes by `nested_absmax`; without it, fp32 absmax per block.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    quant_type: str
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> "QuantState":
        """The same state on `device`; nothing is re-quantized (a subclass keeps its type and fields)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def packed_view(self, packed: torch.Tensor) -> Packed4bit:
        """`packed` with this state as the kernels take it. A weight that is not 2-D is the [1, numel]
        matrix of its flattened elements (the format is laid out along the flat row-major order)."""
        shape = tuple(self.shape) if len(self.shape) == 2 else (1, self.numel)
        return Packed4bit(packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset,
                          self.blocksize, self.nested_blocksize, shape)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """bitsandbytes' serialized form (its `QuantState.as_dict(packed=True)`), key for key."""
        fields = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.double_quant:
            fields.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype=dtype_name(torch.float32),
                nested_offset=self.offset.item(),
            )
            tensors.update(nested_absmax=self.nested_absmax, nested_quant_map=self.nested_code)
        blob = torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)
        return {**tensors, _STATE_KEY_PREFIX + self.quant_type: blob}

    @classmethod
    def from_dict(cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu", where: str = "") -> "QuantState":
        """Rebuild from the serialized form; `where` names the weight in error messages."""
        where = where or "quant state"
        state_keys = [k for k in tensors if k.startswith(_STATE_KEY_PREFIX)]
        if len(state_keys) != 1:
            raise ValueError(
                f"{where}: expected exactly one '{_STATE_KEY_PREFIX}<nf4|fp4>' entry, found {state_keys or 'none'}; "
                "the checkpoint is not a bitsandbytes 4-bit checkpoint or is damaged"
            )
        try:
            fields = json.loads(bytes(tensors[state_keys[0]].to(torch.uint8).cpu().tolist()).decode("utf-8"))
            quant_type, blocksize = fields["quant_type"], int(fields["blocksize"])
            shape, dtype = torch.Size(fields["shape"]), parse_dtype(fields["dtype"], where)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: the entry {state_keys[0]!r} is garbled ({err}); re-export the checkpoint") from err
        if quant_type not in QUANT_TYPES or state_keys[0] != _STATE_KEY_PREFIX + quant_type:
            raise ValueError(f"{where}: quant_type {quant_type!r} does not match the entry {state_keys[0]!r}")
        try:
            check_blocksize(blocksize)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        double_quant = "nested_offset" in fields
        required = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if double_quant else [])
        missing = [k for k in required if k not in tensors]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}; the checkpoint is incomplete")

        state = cls(
            absmax=tensors["absmax"].to(device),
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            code=tensors["quant_map"].to(device, torch.float32),
            quant_type=quant_type,
        )
        if double_quant:
            state.offset = torch.tensor(float(fields["nested_offset"]), dtype=torch.float32, device=device)
            state.nested_absmax = tensors["nested_absmax"].to(device, torch.float32)
            state.nested_code = tensors["nested_quant_map"].to(device, torch.float32)
            state.nested_blocksize = int(fields.get("nested_blocksize", NESTED_BLOCKSIZE))
        state.validate(where)
        return state

    def validate(self, where: str = "quant state") -> None:
        """Check that the tensor sizes agree with shape and blocksize."""
        blocks = -(-self.numel // self.blocksize)
        expected = {"absmax": blocks, "quant_map": 16}
        if self.double_quant:
            expected.update(nested_absmax=-(-blocks // self.nested_blocksize), nested_quant_map=256)
        actual = {
            "absmax": self.absmax.numel(),
            "quant_map": self.code.numel(),
            "nested_absmax": None if self.nested_absmax is None else self.nested_absmax.numel(),
            "nested_quant_map": None if self.nested_code is None else self.nested_code.numel(),
        }
        for key, count in expected.items():
            if actual[key] != count:
                raise ValueError(
                    f"{where}: {key} has {actual[key]} values, but shape {list(self.shape)} with blocksize "
                    f"{self.blocksize} needs {count}; the checkpoint does not match its quant_state"
                )
        if self.double_quant and self.absmax.dtype != torch.uint8:
            raise ValueError(f"{where}: double-quantized absmax must be uint8 codes, got {self.absmax.dtype}")
