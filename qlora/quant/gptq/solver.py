"""GPTQ for one linear layer, as published (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Algorithm 1), with AutoGPTQ's options.

- H = 2 X X^T / n accumulated over the calibration rows X [n, K] (`HessianAccumulator`).
- Dead inputs (H[k, k] = 0) get H[k, k] = 1 and W[:, k] = 0: nothing flows through them.
- Dampening: H += damp_percent * mean(diag(H)) * I. If H is still not positive definite, the
  layer is named in a warning and damp_percent is raised tenfold (up to 1.0) and retried.
- The upper Cholesky factor U of H^-1 (H^-1 = U^T U): its rows are the inverse Hessians of
  the remaining columns, which is what the column-by-column update needs.
- Columns are quantized in blocks of `block_size` (lazy batch updates): within a block each column's
  error e = (w - q) / U[i, i] updates the block's later columns at once; the block's errors update
  every later column in one matmul.
- act-order (desc_act): columns go in order of decreasing diag(H); groups are runs of group_size
  columns in that order, so g_idx[k] = position of k in that order // group_size. static_groups:
  the group parameters are computed on the unquantized W, in the natural column order, before
  anything moves, so g_idx stays k // group_size even with act-order.
- Loss of the layer: sum over columns of (w - q)^2 / U[i, i]^2 / 2, the second-order estimate of
  the increase of ||W X - Q X||^2 (what the progress bar shows per layer).
"""
from __future__ import annotations

import dataclasses
import logging
import torch

from qlora.quant.gptq.weight import GPTQWeight, group_params, quantize_to_grid

logger = logging.getLogger(__name__)
MAX_DAMP_PERCENT = 1.0


class HessianAccumulator:
    """Running H = 2 X X^T / n (fp32) over the rows a layer sees; `add` takes [..., K] inputs."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        new = x.shape[0]
        if new == 0:
            return
        # The running mean form keeps H's scale independent of the number of rows (the published code).
        self.hessian *= self.rows / (self.rows + new)
        self.rows += new
        x = x * (2.0 / self.rows) ** 0.5
        self.hessian.addmm_(x.t(), x)


@dataclasses.dataclass
class GPTQResult:
    weight: GPTQWeight
    dequantized: torch.Tensor  # [N, K] fp32: Q as the checkpoint decodes it (the next sublayers see this)
    loss: float
    damp_percent: float


class NotPositiveDefiniteError(ValueError):
    pass


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float, where: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1, raising damp_percent tenfold while H is not PD."""
    mean_diag = torch.mean(torch.diag(hessian))
    damp = damp_percent
    while True:
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
        if damp >= MAX_DAMP_PERCENT:
            raise NotPositiveDefiniteError(
                f"{where}: the GPTQ Hessian is not positive definite even with damp_percent={damp:g}; the calibration "
                "data reaches too few inputs of this layer: use more (or longer) calibration samples")
        larger = min(damp * 10, MAX_DAMP_PERCENT)
        logger.warning("%s: GPTQ Hessian not positive definite with damp_percent=%g; retrying with %g", where, damp, larger)
        damp = larger


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                  desc_act: bool = False, static_groups: bool = False, damp_percent: float = 0.1, block_size: int = 128,
                  checkpoint_format: str = "gptq", where: str = "layer") -> GPTQResult:
    """Quantize W [N, K] (any float dtype, on the Hessian's device) with GPTQ; see the module docstring."""
    out_dtype = weight.dtype
    W = weight.detach().to(hessian.device, torch.float32).clone()
    H = hessian.clone()
    n, k = W.shape
    size = k if group_size == -1 else group_size
    groups = -(-k // size)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(groups, n, device=W.device)
    zeros = torch.zeros(groups, n, device=W.device)
    if static_groups:
        for g in range(groups):
            scales[g], zeros[g] = group_params(W[:, g * size:(g + 1) * size], bits, sym)
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = inverse_cholesky(H, damp_percent, where)

    Q = torch.zeros_like(W)
    losses = torch.zeros(n, device=W.device)
    scale = zero = None
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        W1 = W[:, start:end].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if static_groups:
                g = (int(perm[column]) if perm is not None else column) // size
                scale, zero = scales[g], zeros[g]
            elif column % size == 0:
                g = column // size
                # The group's columns as updated so far: the block's own from W1, later ones from W.
                span = torch.cat([W1[:, i:], W[:, end:]], dim=1)[:, :size]
                scale, zero = group_params(span, bits, sym)
                scales[g], zeros[g] = scale, zero
            w = W1[:, i]
            d = Hinv1[i, i]
            q = scale * (quantize_to_grid(w, scale, zero, bits) - zero)
            Q[:, column] = q
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, end:] -= Err1 @ Hinv[start:end, end:]

    position = torch.arange(k, device=W.device)
    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        g_idx = position // size if static_groups else inverse // size
    else:
        g_idx = position // size
    codes = torch.round(Q / scales[g_idx].t() + zeros[g_idx].t()).clamp(0, 2**bits - 1)
    packed = GPTQWeight.from_codes(codes, scales, zeros, g_idx, bits, group_size, sym, desc_act, dtype=out_dtype,
                                   checkpoint_format=checkpoint_format)
    return GPTQResult(weight=packed, dequantized=Q, loss=float(losses.sum()), damp_percent=damp)


def quantization_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / 2: the layer's output error on the calibration inputs (H = 2XX^T/n)."""
    delta = (weight.float() - dequantized.float()).to(hessian.device)
    return float(torch.einsum("nk,kl,nl->", delta, hessian, delta) / 2)

