"""AdamW with paged optimizer states, in 32 or 8 bits.

The states live in host memory and visit the device one page at a time for the update (see
pages.py), so the device holds two pages of state whatever the number of trainable parameters.
With 8-bit states both moments are blockwise-quantized (blocks of 256, bitsandbytes' signed
dynamic map for the first moment, its unsigned one for the second); parameters smaller than
`min_8bit_size` keep 32-bit states, where quantization would save little and cost accuracy.

Under FSDP2 the parameters and gradients are DTensors sharded along dim 0: each rank lays out and
updates the states of its own shard (pages.local_tensor), so the states are sharded with them.

The 32-bit update is torch.optim.AdamW's formula op for op, so the two agree to fp32 rounding;
its state_dict uses AdamW's keys (step, exp_avg, exp_avg_sq), and each loads the other's.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional

import torch

from qlora.kernels.optim import reference
from qlora.kernels.optim.ops import adamw8bit_update_
from qlora.optim.pages import DevicePager, Segment, StateLayout, StateSpec, local_tensor
from qlora.quant.nf4.codes import dynamic_map

BLOCKSIZE = 256
_FP32_STATES = (StateSpec("exp_avg", torch.float32), StateSpec("exp_avg_sq", torch.float32))
_8BIT_STATES = (StateSpec("exp_avg", torch.uint8), StateSpec("exp_avg_absmax", torch.float32, BLOCKSIZE),
                StateSpec("exp_avg_sq", torch.uint8), StateSpec("exp_avg_sq_absmax", torch.float32, BLOCKSIZE))
# Which code book each 8-bit moment uses: signed for the first moment, unsigned for the second.
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose states are paged between host memory and the device.

    optim_bits: 32 (fp32 moments) or 8 (blockwise-quantized moments, ~2.03 bytes per parameter
        instead of 8).
    paged: keep the states in host memory (pinned) and copy them to the device a page at a time,
        overlapping the copies with the update. False keeps them on the parameters' device. On CPU
        both are the same thing.
    page_size_mb: bytes of state per page; the device holds two pages while stepping.
    min_8bit_size: parameters with fewer elements keep fp32 states even when optim_bits=8.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, optim_bits: int = 32, paged: bool = True,
                 page_size_mb: float = 64, min_8bit_size: int = 4096):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        betas = tuple(betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        if not page_size_mb > 0:
            raise ValueError(f"page_size_mb must be > 0, got {page_size_mb}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.optim_bits, self.paged, self.min_8bit_size = optim_bits, paged, min_8bit_size
        self._layout = StateLayout(int(page_size_mb * 2**20))
        self._pager: Optional[DevicePager] = None
        self._codes: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ---- layout ---------------------------------------------------------------------------------
    def _is_8bit(self, param: torch.Tensor) -> bool:
        return self.optim_bits == 8 and param.numel() >= self.min_8bit_size

    def _code(self, key: str, device: torch.device) -> torch.Tensor:
        if device not in self._codes:
            self._codes[device] = {k: dynamic_map(device, signed=s) for k, s in _SIGNED.items()}
        return self._codes[device][key]

    def _initial(self, spec: StateSpec) -> float:
        # An all-zero moment: absmax 0 decodes to 0 whatever the code, but the codes should say 0 too.
        if spec.dtype == torch.uint8:
            return float((self._code(spec.key, torch.device("cpu")) == 0).nonzero()[0, 0])
        return 0.0

    def _ensure_layout(self) -> None:
        new = [(index, p) for index, group in enumerate(self.param_groups) for p in group["params"]
               if p not in self._layout]
        if not new:
            return
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) != 1:
            raise ValueError(f"PagedAdamW needs all parameters on one device, got {sorted(map(str, devices))}")
        device = devices.pop()
        for index, p in new:
            eight = self._is_8bit(p)
            self._layout.add(p, index, _8BIT_STATES if eight else _FP32_STATES, BLOCKSIZE if eight else 1)
        paging = self.paged and device.type == "cuda"
        self._layout.seal(self._initial, torch.device("cpu") if paging else device, pin=paging)
        if paging and self._pager is None:
            self._pager = DevicePager(device)

    def _sync(self) -> None:
        if self._pager is not None:
            self._pager.synchronize()

    def state_bytes(self) -> int:
        """Bytes held by the optimizer states (in host memory when paged)."""
        self._ensure_layout()
        return self._layout.state_bytes()

    def device_state_bytes(self) -> int:
        """Bytes of device memory the states take while stepping: two pages when paged."""
        self._ensure_layout()
        return 2 * self._layout.max_page_bytes() if self._pager is not None else self._layout.state_bytes()

    # ---- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_layout()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients; use torch.optim.SparseAdam")
                self.state[p]["step"] = self.state[p].get("step", 0) + 1
        pages = [page for page in self._layout.pages if any(s.param.grad is not None for s in page.segments)]
        if self._pager is not None:
            self._pager.run(pages, self._update_page)
        else:
            for page in pages:
                self._update_page(page, page.storage)
        return loss

    def _update_page(self, page, buffer: torch.Tensor) -> None:
        plain = defaultdict(list)
        for segment in page.segments:
            if segment.param.grad is None:
                continue
            states = segment.views(buffer)
            group = self.param_groups[segment.group]
            if "exp_avg_absmax" in states:
                self._update_8bit(segment, states, group)
            else:
                plain[segment.group].append((segment, states))
        for index, items in plain.items():
            self._update_fp32(items, self.param_groups[index])

    def _update_fp32(self, items: list[tuple[Segment, dict]], group: dict) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params = [s.param_view() for s, _ in items]
        # Moments are fp32 whatever the parameter dtype; low-precision parameters update through fp32 copies.
        work = [p if p.dtype == torch.float32 else p.float() for p in params]
        grads = [s.grad_view().float() for s, _ in items]
        exp_avgs = [states["exp_avg"] for _, states in items]
        exp_avg_sqs = [states["exp_avg_sq"] for _, states in items]
        steps = [self.state[s.param]["step"] for s, _ in items]
        # torch.optim.AdamW's single-tensor update, as foreach ops over the page's segments.
        if weight_decay:
            torch._foreach_mul_(work, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** k) for k in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(work, exp_avgs, denom, [-lr / (1 - beta1 ** k) for k in steps])
        for param, updated in zip(params, work):
            if updated is not param:
                param.copy_(updated)

    def _update_8bit(self, segment: Segment, states: dict, group: dict) -> None:
        (beta1, beta2), device = group["betas"], segment.param.device
        adamw8bit_update_(segment.param_view(), segment.grad_view(), states["exp_avg"], states["exp_avg_absmax"],
                          states["exp_avg_sq"], states["exp_avg_sq_absmax"], self._code("exp_avg", device),
                          self._code("exp_avg_sq", device), step=self.state[segment.param]["step"], lr=group["lr"],
                          beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                          blocksize=BLOCKSIZE)

    # ---- saving and loading ---------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        # The order torch.optim.Optimizer.state_dict numbers the parameters in.
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        self._ensure_layout()
        self._sync()
        packed = super().state_dict()
        for index, p in enumerate(self._params()):
            step = self.state[p].get("step") if p in self.state else None
            if step is None:
                continue
            saved = {"step": torch.tensor(float(step))}
            for spec in self._layout.segments[p][0].specs:
                parts = [s.views(s.page.storage)[spec.key] for s in self._layout.segments[p]]
                value = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
                saved[spec.key] = value.view(local_tensor(p).shape) if spec.per_block == 1 else value
            packed["state"][index] = saved
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["state"]
        # The base class checks the groups and restores their hyperparameters; the states are
        # placed here, into the pages, rather than cast onto the parameters' device.
        super().load_state_dict({**state_dict, "state": {}})
        self._ensure_layout()
        self._sync()
        params = self._params()
        for index, saved in states.items():
            index = int(index)
            if not 0 <= index < len(params):
                raise ValueError(f"optimizer state for parameter {index}, but the optimizer has {len(params)} parameters")
            self._load_param_state(index, params[index], saved)

    def _load_param_state(self, index: int, p: torch.Tensor, saved: dict) -> None:
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in saved]
        if missing:
            raise ValueError(f"optimizer state of parameter {index} lacks {missing}: not an AdamW state")
        local = local_tensor(p)  # under FSDP2 the state is of this rank's shard
        for key in ("exp_avg", "exp_avg_sq"):
            if saved[key].numel() != local.numel():
                raise ValueError(f"optimizer state {key} of parameter {index} has {saved[key].numel()} elements, "
                                 f"the parameter {local.numel()} (shape {tuple(local.shape)}): the checkpoint is of "
                                 "another model")
        self.state[p]["step"] = int(float(saved["step"]))
        eight = self._is_8bit(p)
        for key in ("exp_avg", "exp_avg_sq"):
            value, absmax = saved[key].reshape(-1), saved.get(f"{key}_absmax")
            saved_8bit = value.dtype == torch.uint8
            if saved_8bit and absmax is None:
                raise ValueError(f"optimizer state {key} of parameter {index} is 8-bit but {key}_absmax is missing")
            code = self._code(key, torch.device("cpu"))
            if saved_8bit and not eight:  # 8-bit checkpoint, fp32 states here
                value = reference.dequantize_blockwise_8bit(value.cpu(), absmax.cpu().float(), code, BLOCKSIZE)
            elif eight and not saved_8bit:  # fp32 checkpoint, 8-bit states here
                value, absmax = reference.quantize_blockwise_8bit(value.cpu().float(), code, BLOCKSIZE)
            for segment in self._layout.segments[p]:
                views = segment.views(segment.page.storage)
                views[key].copy_(value[segment.start:segment.start + segment.length])
                if eight:
                    first = segment.start // BLOCKSIZE
                    views[f"{key}_absmax"].copy_(absmax.reshape(-1)[first:first + views[f"{key}_absmax"].numel()])


class PagedAdamW8bit(PagedAdamW):
    """PagedAdamW with 8-bit blockwise-quantized moments (optim_bits=8)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, paged: bool = True, page_size_mb: float = 64,
                 min_8bit_size: int = 4096):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, paged=paged,
                         page_size_mb=page_size_mb, min_8bit_size=min_8bit_size)
