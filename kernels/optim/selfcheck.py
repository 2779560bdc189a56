"""The fused 8-bit AdamW step's self-check (kernels/selfcheck.py runs it on first use): one step on
random codes through the Triton kernel and the twin; codes and absmax must agree bit for bit."""
from __future__ import annotations

import torch

from qlora.kernels.optim import reference
from qlora.kernels.optim.checks import AdamW8bitHyper, AdamW8bitTensors
from qlora.kernels.selfcheck import register, rel_err


@register("adamw8bit")
def check_adamw8bit(device, dtype):
    from qlora.kernels.optim.adamw8bit import adamw8bit_update_triton

    n, blocksize = 700, 256
    g = torch.Generator().manual_seed(2)
    signed = torch.sort(torch.rand(256, generator=g) * 2 - 1).values.to(device)
    unsigned = torch.sort(torch.rand(256, generator=g)).values.to(device)
    blocks = -(-n // blocksize)
    state = dict(param=torch.randn(n, generator=g), grad=torch.randn(n, generator=g) * 0.1,
                 exp_avg=torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g), exp_avg_absmax=torch.rand(blocks, generator=g) * 1e-2,
                 exp_avg_sq=torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g), exp_avg_sq_absmax=torch.rand(blocks, generator=g) * 1e-4)
    state = {k: v.to(device) for k, v in state.items()}
    state["grad"] = state["grad"].to(dtype)
    mine = {k: v.clone() for k, v in state.items()}
    hyper = AdamW8bitHyper(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, blocksize=blocksize)
    adamw8bit_update_triton(AdamW8bitTensors(**mine, signed_code=signed, unsigned_code=unsigned), hyper)
    reference.adamw8bit_update_(AdamW8bitTensors(**state, signed_code=signed, unsigned_code=unsigned), hyper)
    codes_differ = sum((mine[k] != state[k]).sum().item() for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"))
    param_err = rel_err(mine["param"], state["param"])
    return codes_differ == 0 and param_err < 1e-6, f"{codes_differ} codes/absmax differ, parameter relative error {param_err:.1e}"
