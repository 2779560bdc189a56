"""ExpertWeight4bit: a stack of E expert matrices [E, out, in] in NF4/FP4, one bitsandbytes weight each.

Expert e's bytes, absmax and nested state are exactly what bitsandbytes' `quantize_4bit` gives for
W[e] alone (so double quantization has one offset per expert, not one per stack): an expert read
out of the stack is an ordinary 4-bit weight (`expert(e)`, a Packed4bit the existing 4-bit ops take),
and a checkpoint quantized per expert by bitsandbytes maps onto the stack without re-quantizing.

Layout (shared with the grouped kernel in qlora.kernels.moe):
    packed          uint8 [E, out*in // 2]  (any storage dtype, reinterpreted; out*in is even)
    absmax          [E, ceil(out*in / blocksize)]  fp32, or uint8 codes with double quant
    code            fp32 [16]
    nested_absmax   fp32 [E, ceil(nblocks / 256)] or None
    nested_code     fp32 [256] or None
    offset          fp32 [E] or None
    blocksize, nested_blocksize, shape (E, out, in)
The packed stack is the tensor FSDP2 shards along dim 0: whole experts per rank, byte for byte.

Segments. A fused stack such as `gate_up_proj` [E, 2I, H] is two matrices per expert in every
checkpoint (`experts.{e}.gate_proj.weight`, `experts.{e}.up_proj.weight`), and bitsandbytes quantizes
each alone: its own absmax blocks, nested blocks and double-quant offset. `segments` = S keeps that:
each expert is S matrices of [out / S, in] laid one after the other (bytes, absmax, nested absmax),
with offset [E, S]. Quantizing the fused [2I, H] as one matrix instead would give other bytes (one
offset for both) and make a prequantized checkpoint impossible to load without re-quantizing.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from qlora.kernels.nf4 import ops
from qlora.kernels.nf4.format import NESTED_BLOCKSIZE, check_blocksize, check_storage_dtype
from qlora.kernels.nf4.packed import Packed4bit
from qlora.quant.nf4.codes import dynamic_map, get_4bit_code
from qlora.quant.nf4.quantize import check_quant_type, quantize_4bit
from qlora.quant.weight import QuantizedWeight, register_format


@register_format("nf4-experts", "fp4-experts")
@dataclasses.dataclass(kw_only=True)
class ExpertWeight4bit(QuantizedWeight):
    """E frozen [out, in] matrices in 4 bits; `shape` is (E, out, in), `dtype` their dtype before."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    nested_absmax: Optional[torch.Tensor] = dataclasses.field(default=None, metadata={"tensor": True})
    nested_code: Optional[torch.Tensor] = dataclasses.field(default=None, metadata={"tensor": True})
    offset: Optional[torch.Tensor] = dataclasses.field(default=None, metadata={"tensor": True})
    nested_blocksize: int = NESTED_BLOCKSIZE
    segments: int = 1  # independently quantized matrices per expert, stacked along `out`

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def segment_shape(self) -> tuple[int, int]:
        """[out / segments, in]: the shape of each independently quantized matrix."""
        return (self.shape[1] // self.segments, self.shape[2])

    def _segment_sizes(self) -> tuple[int, int, int]:
        """(bytes, absmax blocks, nested blocks) of one segment."""
        n = self.segment_shape[0] * self.segment_shape[1]
        blocks = -(-n // self.blocksize)
        return n // 2, blocks, -(-blocks // self.nested_blocksize)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def quantize(cls, weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 quant_storage: torch.dtype = torch.uint8, segments: int = 1) -> "ExpertWeight4bit":
        """Quantize a dense [E, out, in] stack, one expert at a time (fp32 temporaries of one expert)."""
        if weight.dim() != 3:
            raise ValueError(f"an expert stack is [experts, out, in], got shape {list(weight.shape)}")
        stack = cls.placeholder(weight.shape[0], weight.shape[1], weight.shape[2], weight.device, weight.dtype,
                                quant_type, blocksize, double_quant, quant_storage, segments)
        for e in range(weight.shape[0]):
            stack.set_expert(e, weight[e])
        return stack

    def set_expert(self, e: int, matrix: torch.Tensor) -> None:
        """Quantize one dense [out, in] expert into slot e (what bitsandbytes gives for that matrix)."""
        if tuple(matrix.shape) != tuple(self.shape[1:]):
            raise ValueError(f"expert {e}: shape {list(matrix.shape)}, the stack holds {list(self.shape[1:])}")
        rows = self.segment_shape[0]
        for s in range(self.segments):
            packed, state = quantize_4bit(matrix[s * rows:(s + 1) * rows].to(self.device), self.quant_type,
                                          self.blocksize, self.double_quant)
            self.set_segment(e, s, packed, state)

    def set_segment(self, e: int, s: int, packed: torch.Tensor, state) -> None:
        """Put one already quantized [out / segments, in] matrix (bitsandbytes' bytes and QuantState) into
        segment s of expert e, as it is: nothing is re-quantized."""
        nbytes, blocks, nested = self._segment_sizes()
        if state.quant_type != self.quant_type or state.blocksize != self.blocksize \
                or state.double_quant != self.double_quant or tuple(state.shape) != self.segment_shape:
            raise ValueError(
                f"expert {e}: {state.quant_type}, blocksize {state.blocksize}, double quant {state.double_quant}, shape "
                f"{list(state.shape)}; the stack holds {self.quant_type}, blocksize {self.blocksize}, double quant "
                f"{self.double_quant}, shape {list(self.segment_shape)} per matrix")
        self.packed.view(torch.uint8)[e, s * nbytes:(s + 1) * nbytes].copy_(packed.reshape(-1).view(torch.uint8))
        self.absmax[e, s * blocks:(s + 1) * blocks].copy_(state.absmax)
        if self.double_quant:
            self.nested_absmax[e, s * nested:(s + 1) * nested].copy_(state.nested_absmax)
            self.offset.view(self.num_experts, self.segments)[e, s] = state.offset

    @classmethod
    def placeholder(cls, num_experts: int, out_features: int, in_features: int,
                    device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    quant_storage: torch.dtype = torch.uint8, segments: int = 1) -> "ExpertWeight4bit":
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        check_storage_dtype(quant_storage)
        if segments < 1 or out_features % segments:
            raise ValueError(f"an expert of {out_features} rows cannot be {segments} matrices of equal height")
        n = out_features * in_features
        if (n // segments) % 2:
            raise ValueError(f"an expert matrix of {out_features // segments}x{in_features} has an odd number of "
                             "elements; the stacked 4-bit layout needs whole bytes per matrix")
        storage_bytes = torch.empty(0, dtype=quant_storage).element_size()
        if (n // 2) % storage_bytes:
            raise ValueError(f"quant_storage={quant_storage} needs {n // 2} bytes per expert to be a multiple of "
                             f"{storage_bytes}; use quant_storage=torch.uint8")
        blocks = segments * -(-(n // segments) // blocksize)
        weight = cls(
            packed=torch.empty(num_experts, n // 2 // storage_bytes, dtype=quant_storage, device=device),
            absmax=torch.empty(num_experts, blocks, dtype=torch.uint8 if double_quant else torch.float32,
                               device=device),
            code=get_4bit_code(quant_type, "cpu").to(device),
            shape=torch.Size((num_experts, out_features, in_features)),
            dtype=compute_dtype,
            quant_type=quant_type,
            blocksize=blocksize,
            segments=segments,
        )
        if double_quant:
            nested = segments * -(-(blocks // segments) // NESTED_BLOCKSIZE)
            weight.nested_absmax = torch.empty(num_experts, nested, device=device)
            weight.nested_code = dynamic_map("cpu").to(device)
            weight.offset = torch.empty(num_experts, *((segments,) if segments > 1 else ()), device=device)
        return weight

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                        where: str = "") -> "ExpertWeight4bit":
        """Rebuild from `checkpoint_tensors()`'s form: per expert e (and matrix s), bitsandbytes' entries
        under "{e}.weight", "{e}.weight.absmax", ... ("{e}.{s}.weight", ...) (no re-quantization)."""
        from qlora.quant.nf4.weight import Weight4bit

        where = where or "expert stack"
        by_matrix: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            parts = key.split(".")
            if not parts[0].isdigit() or len(parts) < 2:
                raise ValueError(f"{where}: unexpected entry {key!r}; an expert stack's entries are '<expert>.weight...'")
            segment = int(parts[1]) if parts[1].isdigit() else 0
            rest = ".".join(parts[2:] if parts[1].isdigit() else parts[1:])
            by_matrix.setdefault((int(parts[0]), segment), {})[rest] = tensor
        if not by_matrix:
            raise ValueError(f"{where}: expert 0 is missing; the checkpoint is incomplete")
        experts, segments = 1 + max(e for e, _ in by_matrix), 1 + max(s for _, s in by_matrix)
        missing = [e for e in range(experts) for s in range(segments) if (e, s) not in by_matrix]
        if missing:
            raise ValueError(f"{where}: expert {missing[0]} is missing; the checkpoint is incomplete")
        weights = {key: Weight4bit.from_checkpoint(entries, device, f"{where} expert {key[0]}")
                   for key, entries in sorted(by_matrix.items())}
        first = weights[(0, 0)]
        for (e, _), weight in weights.items():
            layout = (tuple(weight.shape), weight.quant_type, weight.blocksize, weight.double_quant)
            if layout != (tuple(first.shape), first.quant_type, first.blocksize, first.double_quant):
                raise ValueError(f"{where}: expert {e} is {list(weight.shape)} {weight.quant_type} blocksize "
                                 f"{weight.blocksize}, expert 0 is {list(first.shape)} {first.quant_type} blocksize "
                                 f"{first.blocksize}; the experts of one stack share a layout")
        stack = cls.placeholder(experts, first.shape[0] * segments, first.shape[1], device, first.dtype,
                                first.quant_type, first.blocksize, first.double_quant, segments=segments)
        for (e, s), weight in weights.items():
            stack.set_segment(e, s, weight.packed, weight.state)
        return stack

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """bitsandbytes' entries of each expert's matrices, keyed "{e}.weight", "{e}.weight.absmax", ... (with
        segments, "{e}.{s}.weight", ...): the checkpoint names are the saver's business."""
        from qlora.quant.nf4.weight import Weight4bit

        entries = {}
        for e in range(self.num_experts):
            for s in range(self.segments):
                key = f"{e}" if self.segments == 1 else f"{e}.{s}"
                single = Weight4bit.from_state(self._segment_bytes(e, s), self.segment_state(e, s))
                entries.update({f"{key}.{k}": v for k, v in single.checkpoint_tensors().items()})
        return entries

    # ---- one expert ---------------------------------------------------------------------------
    def _segment_bytes(self, e: int, s: int) -> torch.Tensor:
        nbytes = self._segment_sizes()[0]
        return self.packed.view(torch.uint8)[e, s * nbytes:(s + 1) * nbytes]

    def segment(self, e: int, s: int = 0) -> Packed4bit:
        """Matrix s of expert e as the 4-bit ops take it: a Packed4bit of views into the stack (no copy)."""
        _, blocks, nested = self._segment_sizes()
        return Packed4bit(self._segment_bytes(e, s).reshape(-1, 1), self.absmax[e, s * blocks:(s + 1) * blocks],
                          self.code, None if self.nested_absmax is None else self.nested_absmax[e, s * nested:(s + 1) * nested],
                          self.nested_code, None if self.offset is None else self.offset.view(self.num_experts, -1)[e, s],
                          self.blocksize, self.nested_blocksize, self.segment_shape)

    def expert(self, e: int) -> Packed4bit:
        """Expert e as the 4-bit ops take it (one matrix per expert; see `segment` otherwise)."""
        if self.segments != 1:
            raise ValueError(f"expert {e} is {self.segments} separately quantized matrices; take them with segment(e, s)")
        return self.segment(e, 0)

    def segment_stack(self, s: int) -> "ExpertWeight4bit":
        """Matrix s of every expert, as a stack of one matrix per expert: views into this stack, no copy
        (what the grouped kernel takes: one launch per matrix of a fused projection)."""
        nbytes, blocks, nested = self._segment_sizes()
        return dataclasses.replace(
            self, packed=self.packed.view(torch.uint8)[:, s * nbytes:(s + 1) * nbytes],
            absmax=self.absmax[:, s * blocks:(s + 1) * blocks],
            nested_absmax=None if self.nested_absmax is None else self.nested_absmax[:, s * nested:(s + 1) * nested],
            offset=None if self.offset is None else self.offset.view(self.num_experts, -1)[:, s],
            shape=torch.Size((self.num_experts, *self.segment_shape)), segments=1)

    def segment_state(self, e: int, s: int = 0):
        from qlora.quant.nf4.state import QuantState

        view = self.segment(e, s)
        return QuantState(absmax=view.absmax, shape=torch.Size(self.segment_shape), dtype=self.dtype,
                          blocksize=self.blocksize, code=self.code, quant_type=self.quant_type, offset=view.offset,
                          nested_absmax=view.nested_absmax, nested_code=self.nested_code,
                          nested_blocksize=self.nested_blocksize)

    def expert_state(self, e: int):
        if self.segments != 1:
            raise ValueError(f"expert {e} is {self.segments} separately quantized matrices; take them with segment_state(e, s)")
        return self.segment_state(e, 0)

    def dequantize_expert(self, e: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        decode = torch.float32 if dtype == torch.float64 else dtype  # fp32 products: widening them is exact
        parts = [ops.dequantize(self.segment(e, s), decode) for s in range(self.segments)]
        dense = parts[0] if len(parts) == 1 else torch.cat(parts)
        return dense.to(dtype)

    # ---- QuantizedWeight -----------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense [E, out, in] stack (for export and tests: the compute path dequantizes one expert at a time)."""
        return torch.stack([self.dequantize_expert(e, dtype) for e in range(self.num_experts)])

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [E, T, in] -> [E, T, out]: expert e's tokens times W[e]^T (+ bias [E, out]); dX only."""
        if x.dim() != 3 or x.shape[0] != self.num_experts:
            raise ValueError(f"ExpertWeight4bit.linear takes [experts={self.num_experts}, tokens, in], got {list(x.shape)}")
        counts = torch.full((self.num_experts,), x.shape[1], dtype=torch.long)
        y = grouped_linear(x.reshape(-1, x.shape[-1]), self, counts).view(x.shape[0], x.shape[1], -1)
        return y if bias is None else y + bias[:, None, :].to(y.dtype)


# ---- the grouped matmul: the dispatch the experts implementation calls ----------------------------
def grouped_linear(x_sorted: torch.Tensor, expert_weight: ExpertWeight4bit, counts: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ dequant(W[e])^T, rows sorted by expert.

    x_sorted [S, in] (the first counts[0] rows belong to expert 0, ...), counts [E] integer.
    Differentiable in x only (the stack is frozen): the backward dequantizes each active expert
    again instead of saving a dense copy (a 128-expert 2048x768 layer would be 400 MB in bf16).
    """
    if x_sorted.shape[-1] != expert_weight.shape[2]:
        raise ValueError(f"grouped_linear: input has {x_sorted.shape[-1]} features, the experts "
                         f"{list(expert_weight.shape)} need {expert_weight.shape[2]}")
    # The Triton kernel decodes 4-bit stacks with one matrix (one double-quant offset) per expert; a fused
    # projection of several (gate_up) is one launch per matrix over views of the stack, outputs side by
    # side. MXFP4 stacks take the twin, one expert decoded at a time.
    kernel = _grouped_kernel(x_sorted) if isinstance(expert_weight, ExpertWeight4bit) else None
    if x_sorted.shape[0] >= TWIN_ROWS_PER_EXPERT * expert_weight.num_experts:
        kernel = None
    if kernel is not None and expert_weight.segments > 1:
        return torch.cat([kernel(x_sorted, expert_weight.segment_stack(s), counts)
                          for s in range(expert_weight.segments)], dim=1)
    if kernel is not None:
        return kernel(x_sorted, expert_weight, counts)
    return _GroupedLinear4bit.apply(x_sorted, expert_weight, counts)


# From this many rows per expert on (counted without a host sync: all rows over all experts), a GPU takes
# the twin: each expert dequantized once, then cuBLAS. The grouped kernel decodes W_e again in every row
# tile, which stops hiding behind its tensor work: by the machine-code model on an H100
# (benchmarks/moe_kernels_static.py), Mixtral-8x7B's gate_up at 1024 rows per expert takes 6250 us in the
# grouped kernel against ~3100 us dequantized + per-expert cuBLAS, while Qwen3-30B-A3B at 256 rows per
# expert takes 702 us against 1156 us. Estimates, calibration error in benchmarks/results/calibration.json.
TWIN_ROWS_PER_EXPERT = 512


def _grouped_kernel(x: torch.Tensor):
    """The grouped Triton op (qlora.kernels.moe.grouped_linear: same arguments and semantics, one launch
    for all experts) on CUDA when it is installed and the backend allows Triton; else None (the twin)."""
    if x.device.type != "cuda":
        return None
    try:
        from qlora.kernels.backend import use_triton
        from qlora.kernels.moe import grouped_linear as grouped_linear_triton
    except ImportError:
        return None
    return grouped_linear_triton if use_triton(x.device) else None


def _grouped_matmul(x_sorted: torch.Tensor, weight: ExpertWeight4bit, bounds: list[int], transpose: bool) -> torch.Tensor:
    out_features = weight.shape[1] if transpose else weight.shape[2]
    y = x_sorted.new_empty(x_sorted.shape[0], out_features)
    for e in range(len(bounds) - 1):
        start, end = bounds[e], bounds[e + 1]
        if start == end:
            continue
        w = weight.dequantize_expert(e, x_sorted.dtype)  # [out, in]: one expert dense at a time
        torch.mm(x_sorted[start:end], w.t() if transpose else w, out=y[start:end])
    return y


class _GroupedLinear4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_sorted, weight, counts):
        bounds = [0] + torch.cumsum(counts.to("cpu", torch.long), 0).tolist()  # one host sync per call
        if bounds[-1] != x_sorted.shape[0]:
            raise ValueError(f"grouped_linear: counts sum to {bounds[-1]} rows, the input has {x_sorted.shape[0]}")
        ctx.weight, ctx.bounds = weight, bounds  # the packed stack (no dense copy) and the group bounds
        return _grouped_matmul(x_sorted, weight, bounds, transpose=True)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _grouped_matmul(grad_y.contiguous(), ctx.weight, ctx.bounds, transpose=False), None, None
