"""The fused 8-bit AdamW step's self-checks (kernels/selfcheck.py runs them on first use): one step on
random codes through the Triton kernel (or the C kernel, "cpu_adamw8bit") and the twin; codes and
absmax must agree bit for bit."""
from __future__ import annotations

import torch

from qlora.kernels.optim import reference
from qlora.kernels.optim.checks import AdamW8bitHyper, AdamW8bitTensors
from qlora.kernels.selfcheck import register, rel_err


def _compare_one_step(update, device, dtype):
    """One step of `update` and of the twin from the same random state: (codes and absmax that differ,
    the parameter's relative error, elements of the parameter that differ)."""
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
    update(AdamW8bitTensors(**mine, signed_code=signed, unsigned_code=unsigned), hyper)
    reference.adamw8bit_update_(AdamW8bitTensors(**state, signed_code=signed, unsigned_code=unsigned), hyper)
    codes_differ = sum((mine[k] != state[k]).sum().item() for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"))
    return codes_differ, rel_err(mine["param"], state["param"]), (mine["param"] != state["param"]).sum().item()


@register("adamw8bit")
def check_adamw8bit(device, dtype):
    from qlora.kernels.optim.adamw8bit import adamw8bit_update_triton

    codes_differ, param_err, _ = _compare_one_step(adamw8bit_update_triton, device, dtype)
    return codes_differ == 0 and param_err < 1e-6, f"{codes_differ} codes/absmax differ, parameter relative error {param_err:.1e}"


@register("cpu_adamw8bit")
def check_cpu_adamw8bit(device, dtype):
    """The C step (cpu.py), built for this CPU: codes and absmax bit-exact; the parameter bit-exact too
    where the kernel found torch's square root (cpu.torch_sqrt), else within an fp32 rounding."""
    from qlora.kernels.optim.cpu import adamw8bit_update_cpu, torch_sqrt

    codes_differ, param_err, param_differ = _compare_one_step(adamw8bit_update_cpu, device, dtype)
    param_ok = param_differ == 0 if torch_sqrt().exact else param_err < 1e-6
    return codes_differ == 0 and param_ok, (f"{codes_differ} codes/absmax differ, {param_differ} parameter elements "
                                            f"differ (relative error {param_err:.1e}; sqrt: {torch_sqrt().name})")
