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

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def quantize(cls, weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 quant_storage: torch.dtype = torch.uint8) -> "ExpertWeight4bit":
        """Quantize a dense [E, out, in] stack, one expert at a time (fp32 temporaries of one expert)."""
        if weight.dim() != 3:
            raise ValueError(f"an expert stack is [experts, out, in], got shape {list(weight.shape)}")
        stack = cls.placeholder(weight.shape[0], weight.shape[1], weight.shape[2], weight.device, weight.dtype,
                                quant_type, blocksize, double_quant, quant_storage)
        for e in range(weight.shape[0]):
            stack.set_expert(e, weight[e])
        return stack

    def set_expert(self, e: int, matrix: torch.Tensor) -> None:
        """Quantize one dense [out, in] expert into slot e (what bitsandbytes gives for that matrix)."""
        if tuple(matrix.shape) != tuple(self.shape[1:]):
            raise ValueError(f"expert {e}: shape {list(matrix.shape)}, the stack holds {list(self.shape[1:])}")
        packed, state = quantize_4bit(matrix.to(self.device), self.quant_type, self.blocksize, self.double_quant)
        self.packed.view(torch.uint8)[e].copy_(packed.view(-1))
        self.absmax[e].copy_(state.absmax)
        if self.double_quant:
            self.nested_absmax[e].copy_(state.nested_absmax)
            self.offset[e] = state.offset

    @classmethod
    def placeholder(cls, num_experts: int, out_features: int, in_features: int,
                    device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    quant_storage: torch.dtype = torch.uint8) -> "ExpertWeight4bit":
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        check_storage_dtype(quant_storage)
        n = out_features * in_features
        if n % 2:
            raise ValueError(f"an expert of {out_features}x{in_features} has an odd number of elements; the stacked "
                             "4-bit layout needs whole bytes per expert")
        storage_bytes = torch.empty(0, dtype=quant_storage).element_size()
        if (n // 2) % storage_bytes:
            raise ValueError(f"quant_storage={quant_storage} needs {n // 2} bytes per expert to be a multiple of "
                             f"{storage_bytes}; use quant_storage=torch.uint8")
        blocks = -(-n // blocksize)
        weight = cls(
            packed=torch.empty(num_experts, n // 2 // storage_bytes, dtype=quant_storage, device=device),
            absmax=torch.empty(num_experts, blocks, dtype=torch.uint8 if double_quant else torch.float32,
                               device=device),
            code=get_4bit_code(quant_type, "cpu").to(device),
            shape=torch.Size((num_experts, out_features, in_features)),
            dtype=compute_dtype,
            quant_type=quant_type,
            blocksize=blocksize,
        )
        if double_quant:
            weight.nested_absmax = torch.empty(num_experts, -(-blocks // NESTED_BLOCKSIZE), device=device)
            weight.nested_code = dynamic_map("cpu").to(device)
            weight.offset = torch.empty(num_experts, device=device)
        return weight

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                        where: str = "") -> "ExpertWeight4bit":
        """Rebuild from `checkpoint_tensors()`'s form: per expert e, bitsandbytes' entries of its matrix
        under "{e}.weight", "{e}.weight.absmax", ... (no re-quantization)."""
        from qlora.quant.nf4.weight import Weight4bit

        where = where or "expert stack"
        by_expert: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            index, _, rest = key.partition(".")
            if not index.isdigit():
                raise ValueError(f"{where}: unexpected entry {key!r}; an expert stack's entries are '<expert>.weight...'")
            by_expert.setdefault(int(index), {})[rest] = tensor
        if sorted(by_expert) != list(range(len(by_expert))) or not by_expert:
            missing = sorted(set(range(max(by_expert, default=-1) + 1)) - set(by_expert))
            raise ValueError(f"{where}: expert {missing[0] if missing else 0} is missing; the checkpoint is incomplete")
        experts = [Weight4bit.from_checkpoint(by_expert[e], device, f"{where} expert {e}") for e in range(len(by_expert))]
        first = experts[0]
        for e, expert in enumerate(experts):
            layout = (tuple(expert.shape), expert.quant_type, expert.blocksize, expert.double_quant)
            if layout != (tuple(first.shape), first.quant_type, first.blocksize, first.double_quant):
                raise ValueError(f"{where}: expert {e} is {list(expert.shape)} {expert.quant_type} blocksize "
                                 f"{expert.blocksize}, expert 0 is {list(first.shape)} {first.quant_type} blocksize "
                                 f"{first.blocksize}; the experts of one stack share a layout")
        stack = cls(packed=torch.stack([x.packed.reshape(-1) for x in experts]),
                    absmax=torch.stack([x.absmax for x in experts]), code=first.code,
                    shape=torch.Size((len(experts), *first.shape)), dtype=first.dtype, quant_type=first.quant_type,
                    blocksize=first.blocksize, nested_blocksize=first.nested_blocksize)
        if first.double_quant:
            stack.nested_absmax = torch.stack([x.nested_absmax for x in experts])
            stack.nested_code = first.nested_code
            stack.offset = torch.stack([x.offset.reshape(()) for x in experts])
        return stack

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Per expert, bitsandbytes' entries of that expert's matrix, keyed "{e}.weight", "{e}.weight.absmax", ..."""
        from qlora.quant.nf4.weight import Weight4bit

        entries = {}
        for e in range(self.num_experts):
            state = self.expert_state(e)
            single = Weight4bit.from_state(self.packed[e], state)
            entries.update({f"{e}.{k}": v for k, v in single.checkpoint_tensors().items()})
        return entries

    # ---- one expert ---------------------------------------------------------------------------
    def expert(self, e: int) -> Packed4bit:
        """Expert e as the 4-bit ops take it: a [out, in] Packed4bit of views into the stack (no copy)."""
        return Packed4bit(self.packed[e].reshape(-1, 1), self.absmax[e], self.code,
                          None if self.nested_absmax is None else self.nested_absmax[e], self.nested_code,
                          None if self.offset is None else self.offset[e], self.blocksize, self.nested_blocksize,
                          (self.shape[1], self.shape[2]))

    def expert_state(self, e: int):
        from qlora.quant.nf4.state import QuantState

        return QuantState(absmax=self.absmax[e], shape=torch.Size(self.shape[1:]), dtype=self.dtype,
                          blocksize=self.blocksize, code=self.code, quant_type=self.quant_type,
                          offset=None if self.offset is None else self.offset[e],
                          nested_absmax=None if self.nested_absmax is None else self.nested_absmax[e],
                          nested_code=self.nested_code, nested_blocksize=self.nested_blocksize)

    def dequantize_expert(self, e: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if dtype == torch.float64:  # the decoded values are fp32 products: widening them is exact
            return ops.dequantize(self.expert(e), torch.float32).double()
        return ops.dequantize(self.expert(e), dtype)

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
    kernel = _grouped_kernel(x_sorted)
    if kernel is not None:
        return kernel(x_sorted, expert_weight, counts)
    return _GroupedLinear4bit.apply(x_sorted, expert_weight, counts)


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
