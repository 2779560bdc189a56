"""The grouped 4-bit matmul as a torch.library custom op (qlora::grouped_matmul_4bit), its dispatch, the
autograd Function of the frozen expert linears and the functional API `grouped_linear_4bit`.

As for the dense 4-bit ops (kernels/nf4/ops.py): register_fake lets torch.compile trace a model that
calls the op, and the backend choice (QLORA_BACKEND, the device, the self-check) runs inside it at run
time. On the Triton backend every expert runs in one launch of grouped.py's kernel, forward and
backward alike (fp32 inputs too: unlike the dense layer there is no one dense W for cuBLAS to take
over); elsewhere the twin, reference.grouped_matmul_torch.
"""
from __future__ import annotations

import torch

from qlora.kernels import selfcheck
from qlora.kernels.backend import use_triton
from qlora.kernels.moe import reference
from qlora.kernels.moe import selfcheck as _checks  # noqa: F401  (registers the grouped kernel's self-check)
from qlora.kernels.moe.checks import check_experts, check_grouped_input
from qlora.kernels.moe.packed import PackedExperts4bit, as_packed_experts
from qlora.kernels.nf4.ops import autocast_inputs
from qlora.kernels.packed_args import from_op_args, op_schema, save_weight, saved_weight

SELF_CHECK = "moe_grouped"


def matmul(a: torch.Tensor, experts: PackedExperts4bit, counts: torch.Tensor, transpose_weight: bool) -> torch.Tensor:
    """a [T, in] @ W_e^T per expert's rows if transpose_weight, else a [T, out] @ W_e, through
    qlora::grouped_matmul_4bit: the one place a PackedExperts4bit is flattened into op arguments."""
    a, _ = autocast_inputs(a, None)
    return grouped_matmul_4bit_op(a, counts, *experts, transpose_weight)


@torch.library.custom_op(
    "qlora::grouped_matmul_4bit", mutates_args=(),
    schema=f"(Tensor a, Tensor counts, {op_schema(PackedExperts4bit)}, bool transpose_weight) -> Tensor",
)
def grouped_matmul_4bit_op(a: torch.Tensor, counts: torch.Tensor, *expert_fields_and_options) -> torch.Tensor:
    """(a, counts, *PackedExperts4bit fields, transpose_weight): rows of a sorted by expert, counts[e] of
    them for expert e; a @ W_e^T (forward) or a @ W_e (backward to the input) per expert, in a's dtype."""
    experts, (transpose_weight,) = from_op_args(PackedExperts4bit, expert_fields_and_options)
    check_experts(experts)
    check_grouped_input(a, counts, experts, transpose_weight)
    # Autocast is applied by matmul() before the op: in here every path computes in a's dtype.
    with torch.autocast(a.device.type, enabled=False):
        if use_triton(a.device) and selfcheck.passed(SELF_CHECK, a.device, a.dtype):
            from qlora.kernels.moe.grouped import grouped_matmul_4bit

            return grouped_matmul_4bit(a, experts, counts, transpose_weight)
        return reference.grouped_matmul_torch(a, experts, counts, transpose_weight)


@grouped_matmul_4bit_op.register_fake
def _(a, counts, *expert_fields_and_options):
    experts, (transpose_weight,) = from_op_args(PackedExperts4bit, expert_fields_and_options)
    _, out_features, in_features = experts.shape
    return a.new_empty((a.shape[0], out_features if transpose_weight else in_features))


class GroupedLinear4bitFunction(torch.autograd.Function):
    """Y[rows of e] = X[rows of e] @ W_e^T for frozen 4-bit experts; backward dX only (no dW).

    Saved for backward: the packed stack and the counts, never a dequantized expert; the backward
    decodes W_e again inside its tiles (one more pass over ~0.53 byte/param)."""

    @staticmethod
    def forward(ctx, x, counts, experts: PackedExperts4bit):
        y = matmul(x, experts, counts, transpose_weight=True)
        save_weight(ctx, experts)
        ctx.counts = counts  # an index, never differentiated: kept off the saved-tensor list of the weight
        return y

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        experts = saved_weight(ctx, PackedExperts4bit)
        return matmul(grad_output.contiguous(), experts, ctx.counts, transpose_weight=False), None, None


def grouped_linear_4bit(x: torch.Tensor, experts: PackedExperts4bit, counts: torch.Tensor) -> torch.Tensor:
    """x [T, in] with rows sorted by expert (counts[e] rows for expert e, summing to T) -> [T, out],
    rows of e @ dequant(W_e)^T in x's dtype (fp32 accumulation); differentiable in x."""
    if x.dim() != 2:
        raise ValueError(f"grouped_linear_4bit takes [tokens, features] rows sorted by expert, got shape {list(x.shape)}")
    if x.shape[1] != experts.shape[2]:
        raise ValueError(f"input has {x.shape[1]} features, the experts {list(experts.shape)} need {experts.shape[2]}")
    return GroupedLinear4bitFunction.apply(x, counts, experts)


def grouped_linear(x_sorted: torch.Tensor, experts, counts: torch.Tensor) -> torch.Tensor:
    """grouped_linear_4bit for any expert stack with PackedExperts4bit's fields (the quantized expert
    weight of qlora.quant passes as it is), counts moved to the input's device (an asynchronous copy
    where they were computed on the host)."""
    return grouped_linear_4bit(x_sorted, as_packed_experts(experts), counts.to(x_sorted.device, non_blocking=True))
