"""GPTQWeight: the GPTQ format (AutoGPTQ / GPTQModel / optimum checkpoints) as a QuantizedWeight.

Checkpoint entries per layer (relative to its prefix, bias apart): qweight, qzeros, scales, g_idx.
The held state is those tensors, except that an act-order checkpoint (g_idx not non-decreasing) is
permuted once at load: qweight's K rows and g_idx are held sorted by group, with `perm` mapping
held channel i to checkpoint channel perm[i]; `checkpoint_tensors()` undoes it, so what is saved is
the checkpoint's own form. v1 ("gptq") stores each zero minus one, v2 ("gptq_v2") the zero itself:
`zero_offset` (1 or 0) is what the kernels add back.

Group parameters (`group_params`) are GPTQ's quantizer: per output row and group, the range
[min(x, 0), max(x, 0)] (symmetric: +-max|x|) over 2**bits - 1 steps; the zero of a symmetric grid
is 2**(bits-1) (so 4-bit v1 zeros are 0x77777777). The scale is rounded to fp16 before it is used,
so the values the solver propagates errors against are the ones a checkpoint decodes to. v1 cannot
store a zero of 0 (z - 1 = -1 would wrap): an asymmetric group whose zero would round to 0 (all its
values >= -scale/2) gets zero 1 and the scale max(x) / (2**bits - 2), which still spans the group.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from qlora.errors import DamagedFileError, OptionError, UnsupportedError
from qlora.kernels.gptq import ops as gptq_ops
from qlora.kernels.gptq.format import BITS, PackedGPTQ, check_bits, check_packed, pack, packed_words, unpack
from qlora.quant.weight import QuantizedWeight, register_format

CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # format -> zero_offset
REPACKED_FORMATS = ("marlin", "gptq_p", "bitblas", "ipex", "qqq", "awq")


def check_group_size(group_size, in_features: Optional[int] = None) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise OptionError(f"GPTQ group_size must be -1 (one group per row) or a positive number of input channels "
                         f"(32, 64, 128 are usual), got {group_size!r}")
    return group_size


def check_checkpoint_format(name: str) -> str:
    name = str(name or "gptq").lower()
    if name in REPACKED_FORMATS:
        raise UnsupportedError(
            f"GPTQ checkpoint_format={name!r} is a repacked layout ({name} kernels' own tile order), not the "
            "qweight/qzeros/scales/g_idx tensors qlora reads; load the 'gptq' (v1) or 'gptq_v2' version of the model, "
            "or convert it back with GPTQModel")
    if name not in CHECKPOINT_FORMATS:
        raise OptionError(f"unknown GPTQ checkpoint_format {name!r}; qlora reads {sorted(CHECKPOINT_FORMATS)}")
    return name


def group_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32 holding fp16 values, integer zero as fp32) per row of x [rows, columns]."""
    maxq = 2**bits - 1
    x = x.float()
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = _fp16_scale((xmax - xmin) / maxq)
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    zero = torch.round(-xmin / scale)
    low = zero < 1  # v1 stores z - 1: keep z >= 1 (module docstring)
    scale = torch.where(low, _fp16_scale(xmax / (maxq - 1)), scale)
    return scale, zero.clamp(1, maxq)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    fp16_tiny = torch.finfo(torch.float16).tiny
    return scale.clamp(min=fp16_tiny).to(torch.float16).float()


def quantize_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(x / scale) + zero, 0, 2**bits - 1); scale/zero broadcast against x."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


@register_format("gptq")
@dataclasses.dataclass(kw_only=True)
class GPTQWeight(QuantizedWeight):
    data_name = "qweight"
    data_key = "qweight"

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    perm: Optional[torch.Tensor] = dataclasses.field(default=None, metadata={"tensor": True})
    shape: torch.Size
    dtype: torch.dtype = torch.float16
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"

    @property
    def zero_offset(self) -> int:
        return CHECKPOINT_FORMATS[self.checkpoint_format]

    def kernel_view(self) -> PackedGPTQ:
        return PackedGPTQ(self.qweight, self.qzeros, self.scales, self.g_idx, self.perm, self.bits, self.zero_offset,
                          tuple(self.shape))

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                   bits: int, group_size: int, sym: bool, desc_act: bool, dtype: torch.dtype,
                   checkpoint_format: str = "gptq") -> "GPTQWeight":
        """Pack integer codes [N, K], per-group scales and zeros [groups, N] and g_idx [K] (checkpoint order)."""
        offset = CHECKPOINT_FORMATS[check_checkpoint_format(checkpoint_format)]
        n, k = codes.shape
        weight = cls(qweight=pack(codes.t().to(torch.int32), bits, dim=0),
                     qzeros=pack((zeros.round().to(torch.int32) - offset), bits, dim=1),
                     scales=scales.to(torch.float16).contiguous(), g_idx=g_idx.to(torch.int32).contiguous(),
                     shape=torch.Size((n, k)), dtype=dtype, bits=bits, group_size=group_size, sym=sym,
                     desc_act=desc_act, checkpoint_format=checkpoint_format)
        return weight.held_sorted()

    @classmethod
    def quantize(cls, weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                 desc_act: bool = False, checkpoint_format: str = "gptq") -> "GPTQWeight":
        """Round-to-nearest onto GPTQ's group grid (no calibration: `qlora.quant.gptq.solver` is GPTQ)."""
        check_bits(bits)
        check_group_size(group_size)
        n, k = weight.shape
        size = k if group_size == -1 else group_size
        groups = -(-k // size)
        padded = torch.nn.functional.pad(weight.float(), (0, groups * size - k)).view(n, groups, size)
        scale, zero = group_params(padded.reshape(n * groups, size), bits, sym)
        scale, zero = scale.view(n, groups, 1), zero.view(n, groups, 1)
        codes = quantize_to_grid(padded, scale, zero, bits).view(n, -1)[:, :k]
        g_idx = torch.arange(k, device=weight.device) // size
        return cls.from_codes(codes, scale.view(n, groups).t(), zero.view(n, groups).t(), g_idx, bits, group_size, sym,
                              desc_act=False, dtype=weight.dtype, checkpoint_format=checkpoint_format)

    @classmethod
    def placeholder(cls, out_features: int, in_features: int, device=None, compute_dtype: torch.dtype = torch.bfloat16,
                    bits: int = 4, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                    checkpoint_format: str = "gptq") -> "GPTQWeight":
        check_bits(bits)
        check_group_size(group_size)
        check_checkpoint_format(checkpoint_format)
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        return cls(qweight=torch.empty(packed_words(in_features, bits), out_features, dtype=torch.int32, device=device),
                   qzeros=torch.empty(groups, packed_words(out_features, bits), dtype=torch.int32, device=device),
                   scales=torch.empty(groups, out_features, dtype=torch.float16, device=device),
                   g_idx=torch.empty(in_features, dtype=torch.int32, device=device),
                   shape=torch.Size((out_features, in_features)), dtype=compute_dtype, bits=bits,
                   group_size=group_size, sym=sym, desc_act=desc_act, checkpoint_format=checkpoint_format)

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], device="cpu", where: str = "", bits: Optional[int] = None,
                        group_size: Optional[int] = None, sym: bool = True, desc_act: bool = False,
                        checkpoint_format: str = "gptq") -> "GPTQWeight":
        """A layer's qweight/qzeros/scales/g_idx; bits are read from the shapes when not given
        (and checked against them when given). A checkpoint without g_idx (AutoGPTQ before 0.3)
        gets the static one, k // group_size."""
        where = where or "GPTQ weight"
        missing = [key for key in ("qweight", "qzeros", "scales") if key not in tensors]
        if missing:
            raise DamagedFileError(f"{where}: the GPTQ checkpoint has no {', '.join(missing)} for this layer; it is incomplete")
        unknown = sorted(set(tensors) - {"qweight", "qzeros", "scales", "g_idx"})
        if unknown:
            raise DamagedFileError(f"{where}: unexpected GPTQ entries {unknown}; a repacked (marlin/exllama) checkpoint? "
                             "qlora reads the 'gptq'/'gptq_v2' layout")
        qweight, qzeros, scales = (tensors[k].to(device) for k in ("qweight", "qzeros", "scales"))
        n = scales.shape[-1]
        g_idx = tensors.get("g_idx")
        if bits is None:  # K * bits / 32 words per column of qweight (N * bits / 32 per row of qzeros)
            bits = (qweight.shape[0] * 32 // g_idx.shape[0] if g_idx is not None and g_idx.numel()
                    else qzeros.shape[-1] * 32 // max(n, 1))
            if bits not in BITS:
                raise DamagedFileError(f"{where}: the GPTQ checkpoint's shapes are inconsistent: qweight {list(qweight.shape)}, "
                                 f"qzeros {list(qzeros.shape)}, scales {list(scales.shape)}"
                                 f"{'' if g_idx is None else f', g_idx {list(g_idx.shape)}'} fit no width of {list(BITS)} bits")
        check_bits(bits)
        if g_idx is None:
            k = qweight.shape[0] * 32 // bits
            size = k if group_size in (None, -1) else group_size
            g_idx = torch.arange(k, dtype=torch.int32) // size
        g_idx = g_idx.to(device=device, dtype=torch.int32)
        k = g_idx.shape[0]
        if group_size is None:
            group_size = -1 if scales.shape[0] == 1 else int(torch.bincount(g_idx.long()).max())
        weight = cls(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, shape=torch.Size((n, k)),
                     dtype=scales.dtype, bits=bits, group_size=check_group_size(group_size), sym=sym, desc_act=desc_act,
                     checkpoint_format=check_checkpoint_format(checkpoint_format))
        check_packed(weight.kernel_view(), where)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
            raise DamagedFileError(f"{where}: g_idx holds groups outside [0, {scales.shape[0]}); the checkpoint is inconsistent")
        return weight.held_sorted()

    def held_sorted(self) -> "GPTQWeight":
        """Act-order applied once: K rows grouped contiguously (module docstring). No-op when sorted."""
        if self.perm is not None or bool((self.g_idx[1:] >= self.g_idx[:-1]).all()):
            return self
        perm = torch.argsort(self.g_idx.long(), stable=True)
        k = self.shape[1]
        codes = unpack(self.qweight, self.bits, k, dim=0)[perm]
        return self.replace(qweight=pack(codes, self.bits, dim=0), g_idx=self.g_idx[perm].contiguous(), perm=perm)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        if self.perm is None:
            return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        codes = unpack(self.qweight, self.bits, self.shape[1], dim=0)
        original = torch.empty_like(codes)
        original[self.perm] = codes
        g_idx = torch.empty_like(self.g_idx)
        g_idx[self.perm] = self.g_idx
        return {"qweight": pack(original, self.bits, dim=0), "qzeros": self.qzeros, "scales": self.scales, "g_idx": g_idx}

    # ---- the operations ------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if dtype == torch.float64:  # fp32 products are exact (gptq_reference): widening them is too
            return gptq_ops.dequantize(self.kernel_view(), torch.float32).double()
        return gptq_ops.dequantize(self.kernel_view(), dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return gptq_ops.linear_gptq(x, self.kernel_view(), bias)
