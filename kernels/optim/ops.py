"""The fused 8-bit AdamW step: the public op, and the dispatch between the Triton kernel, the C kernel
(cpu.py) and the reference (the checks they share are in checks.py), by the one rule of
kernels/backend.py: Triton on a capable GPU, the C kernel on CPU where a compiler builds it, the
reference otherwise or under QLORA_BACKEND=torch."""
from __future__ import annotations

import torch

from qlora.kernels.optim import reference
from qlora.kernels import selfcheck
from qlora.kernels.optim import selfcheck as _checks  # noqa: F401  (registers the step's self-check)
from qlora.kernels.backend import use_cpu_kernels, use_triton
from qlora.kernels.optim import cpu as cpu_kernels
from qlora.kernels.optim.checks import AdamW8bitHyper, AdamW8bitTensors, check_adamw8bit_args


def adamw8bit_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    signed_code: torch.Tensor,
    unsigned_code: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    blocksize: int = 256,
) -> None:
    """One AdamW step with 8-bit moments, in place (see reference.adamw8bit_update_ for the math).

    Runs the fused Triton kernel when the backend picks Triton for param's device, the C kernel when
    it picks the CPU kernels, the reference otherwise (all three give the same codes and absmax). Either way it runs outside autograd, as an optimizer step does: the kernel writes
    through raw pointers, which autograd could not record anyway.
    """
    tensors = AdamW8bitTensors(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_code,
                               unsigned_code)
    hyper = AdamW8bitHyper(step, lr, beta1, beta2, eps, weight_decay, blocksize)
    with torch.no_grad():
        if use_triton(param.device) and selfcheck.passed("adamw8bit", param.device, grad.dtype):
            # Imported here: the CPU path must never import triton.
            from qlora.kernels.optim.adamw8bit import adamw8bit_update_triton

            adamw8bit_update_triton(tensors, hyper)
            return
        check_adamw8bit_args(tensors, hyper)
        if use_cpu_kernels(param.device, cpu_kernels.available) and selfcheck.passed("cpu_adamw8bit", param.device, grad.dtype):
            cpu_kernels.adamw8bit_update_cpu(tensors, hyper)
            return
        reference.adamw8bit_update_(tensors, hyper)
