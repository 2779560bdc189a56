"""The 4-bit ops as torch.library custom ops (qlora::dequantize_4bit, qlora::matmul_4bit), and the
dispatch rule that picks an implementation.

Custom ops are opaque to torch.compile: with their register_fake shape functions a model calling
them traces with fullgraph=True, and the backend choice (env read, device test, M buckets) runs
inside the op at run time rather than in the traced graph.

Dispatch rule for the matmul on the Triton backend, by M = rows of the 2-D input:
- M <= GEMV_MAX_M: split-K GEMV (gemv.py). Decode: W is read once for all rows, fp32 partials.
- M <= FUSED_MAX_M: the fused kernel (matmul.py), dequantizing W tiles inside the K loop. The
  product is still bound by reading W: a 4096x4096 layer at M = 256 does 8.6 GFLOP (~11 us at
  790 TFLOP/s) against 8.65 MB of NF4 (~3 us) plus, unfused, 33.6 MB of bf16 written and read back
  (~11 us at 3 TB/s); fusing removes that round trip.
- M > FUSED_MAX_M, or fp32 input above GEMV_MAX_M: dequantize W to the compute dtype with the
  Triton kernel (one launch, ~14 us for 4096x4096) and call cuBLAS. At M = 4096 the GEMM is ~173 us, so the unfused dequant costs ~8%,
  while a Triton tl.dot loop with in-loop dequant typically trails cuBLAS by more than that at
  large M. The dense W is a temporary of this call: it is freed before backward, which dequantizes
  again from the packed bytes.
Both thresholds are starting points from that arithmetic, NOT measurements: to be tuned on H100
with benchmarks/kernels_gpu.py, which times all three paths per M and records where they cross.
"""
from __future__ import annotations

from typing import Optional

import torch

from qlora.kernels import reference
from qlora.kernels.backend import use_triton
from qlora.kernels.checks import check_compute_dtype, check_matmul_input, check_weight
from qlora.kernels.packed import OP_SCHEMA, Packed4bit

GEMV_MAX_M = 16  # to be tuned on H100
FUSED_MAX_M = 1024  # to be tuned on H100
PATHS = ("auto", "gemv", "fused", "dequant_matmul")


def choose_path(m: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """The Triton implementation the dispatch rule picks for a 2-D input of m rows in `dtype`."""
    if m <= GEMV_MAX_M:
        return "gemv"
    # fp32 products have no tensor cores to keep busy (unless TF32 is allowed), so the fused kernel's
    # reason to exist is gone: cuBLAS SGEMM on the dequantized W is the better-tuned CUDA-core loop.
    if m <= FUSED_MAX_M and dtype != torch.float32:
        return "fused"
    return "dequant_matmul"


# ---- the one place a Packed4bit is flattened into arguments, in its field order -------------------
def dequantize(weight: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) [out, in] in `dtype`, through qlora::dequantize_4bit (the backend's implementation)."""
    return dequantize_4bit_op(*weight, dtype)


def matmul(a: torch.Tensor, weight: Packed4bit, bias: Optional[torch.Tensor], transpose_weight: bool,
           path: str = "auto") -> torch.Tensor:
    """a [M, in] @ W^T (+ bias) if transpose_weight, else a [M, out] @ W, through qlora::matmul_4bit."""
    return matmul_4bit_op(a, *weight, bias, transpose_weight, path)


# ---- qlora::dequantize_4bit -------------------------------------------------------------------
@torch.library.custom_op("qlora::dequantize_4bit", mutates_args=(), schema=f"({OP_SCHEMA}, ScalarType dtype) -> Tensor")
def dequantize_4bit_op(*weight_fields_and_dtype) -> torch.Tensor:
    """(*Packed4bit fields, dtype) -> dequant(W) [out, in] in dtype."""
    *fields, dtype = weight_fields_and_dtype
    weight = Packed4bit.from_op_args(fields)
    check_weight(weight)
    check_compute_dtype(dtype, "dequantize_4bit's output dtype")
    if use_triton(weight.device):
        from qlora.kernels.dequantize import dequantize_4bit_triton

        return dequantize_4bit_triton(weight, dtype)
    return reference.dequantize_4bit_torch(weight, dtype)


@dequantize_4bit_op.register_fake
def _(*weight_fields_and_dtype):
    *fields, dtype = weight_fields_and_dtype
    weight = Packed4bit.from_op_args(fields)
    return weight.packed.new_empty(weight.shape, dtype=dtype)


# ---- qlora::matmul_4bit -------------------------------------------------------------------------
_WEIGHT_FIELDS = len(Packed4bit._fields)


@torch.library.custom_op(
    "qlora::matmul_4bit", mutates_args=(),
    schema=f"(Tensor a, {OP_SCHEMA}, Tensor? bias, bool transpose_weight, str path) -> Tensor",
)
def matmul_4bit_op(a: torch.Tensor, *weight_fields_and_options) -> torch.Tensor:
    """(a, *Packed4bit fields, bias, transpose_weight, path): a [M, in] @ W^T (+ bias) if
    transpose_weight, else a [M, out] @ W; in a's dtype."""
    weight = Packed4bit.from_op_args(weight_fields_and_options[:_WEIGHT_FIELDS])
    bias, transpose_weight, path = weight_fields_and_options[_WEIGHT_FIELDS:]
    check_weight(weight)
    check_matmul_input(a, weight, transpose_weight, bias)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not use_triton(a.device):
        if path not in ("auto", "dequant_matmul"):
            raise ValueError(f"path={path!r} is a Triton kernel, but the backend here is the PyTorch reference; "
                             "set QLORA_BACKEND=triton (on CPU also TRITON_INTERPRET=1) or use path='auto'")
        return _dense_product(a, reference.dequantize_4bit_torch(weight, a.dtype), bias, transpose_weight)
    path = choose_path(a.shape[0], a.dtype) if path == "auto" else path
    if path == "gemv":
        from qlora.kernels.gemv import gemv_4bit

        return gemv_4bit(a, weight, transpose_weight, bias)
    if path == "fused":
        from qlora.kernels.matmul import matmul_4bit_fused

        return matmul_4bit_fused(a, weight, transpose_weight, bias)
    from qlora.kernels.dequantize import dequantize_4bit_triton

    return _dense_product(a, dequantize_4bit_triton(weight, a.dtype), bias, transpose_weight)


def _dense_product(a: torch.Tensor, dense: torch.Tensor, bias: Optional[torch.Tensor], transpose_weight: bool) -> torch.Tensor:
    if transpose_weight:
        return reference.linear_dequantized(a, dense, bias)
    return reference.linear_dequantized_grad_input(a, dense)


@matmul_4bit_op.register_fake
def _(a, *weight_fields_and_options):
    weight = Packed4bit.from_op_args(weight_fields_and_options[:_WEIGHT_FIELDS])
    transpose_weight = weight_fields_and_options[_WEIGHT_FIELDS + 1]
    return a.new_empty((a.shape[0], weight.shape[0] if transpose_weight else weight.shape[1]))
