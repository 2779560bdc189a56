"""The preference losses on sequence log-probabilities: DPO (sigmoid, IPO, hinge), ORPO, SimPO, KTO.

Pure tensor functions, one per objective, each returning per-example losses and the implicit
rewards TRL logs. They never see a model: `qlora.objectives.objective` computes the log-probs (one
concatenated forward for chosen and rejected) and the reference's, and sums these losses across
micro-batches and ranks. The formulas follow the papers and TRL 1.16, which the tests use as the
oracle on the same log-probs:

- DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)),
  with conservative label smoothing eps (cDPO): (1 - eps) * that + eps * the same with the pair
  flipped. IPO (Azar et al. 2023, eq. 17): (delta - 1 / (2 beta))^2 on log-ratios averaged per
  completion token, as TRL does (its authors' normalisation: the squared loss would otherwise grow
  with length). Hinge (SLiC, Zhao et al. 2023): relu(1 - beta * delta).
- ORPO (Hong et al. 2024, eq. 6-7): NLL of the chosen completion minus lambda * log sigmoid(log odds
  ratio), the odds taken on per-token average log-probs; no reference model.
- SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (avg chosen - avg rejected) - gamma) on per-token
  average log-probs; no reference model.
- KTO (Ethayarajh et al. 2024, eq. 7): desirable 1 - sigmoid(beta * (log-ratio - z)), undesirable
  1 - sigmoid(beta * (z - log-ratio)), weighted; z = max(0, mean KL estimate), detached.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclasses.dataclass
class PairTerms:
    """Per-pair losses [B] and the rewards TRL logs for them [B] (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict = dataclasses.field(default_factory=dict)  # objective-specific per-pair terms, detached


def _smoothed_logsigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # eps = 0 keeps exactly -logsigmoid(logits): the second term is multiplied by zero, not skipped,
    # so the autograd graph (and the bits) are the same either way.
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: Optional[torch.Tensor] = None,
             rejected_tokens: Optional[torch.Tensor] = None) -> PairTerms:
    """DPO and its IPO / hinge variants on summed completion log-probs of policy and reference.
    `chosen_tokens` / `rejected_tokens`: completion lengths, needed by IPO's per-token average."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = _smoothed_logsigmoid_loss(beta * delta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' averages the log-ratios per completion token: pass chosen_tokens "
                             "and rejected_tokens")
        average = (chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1))
        losses = (average - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    return PairTerms(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation: log(-expm1(x)) near 0, log1p(-exp(x)) below -ln 2
    (Maechler 2012: each form loses all digits on the other side of the branch)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *,
                    orpo_lambda: float) -> PairTerms:
    """ORPO's odds-ratio term per pair, -lambda * log sigmoid(log odds(chosen) - log odds(rejected)), on
    per-token average log-probs (the chosen NLL is added by the caller, normalised by chosen tokens)."""
    # At least fp32: log1mexp near 0 cancels catastrophically in half precision.
    widen = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # noqa: E731
    chosen, rejected = widen(chosen_mean_logps), widen(rejected_mean_logps)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return PairTerms(-orpo_lambda * ratio, orpo_lambda * chosen.detach(), orpo_lambda * rejected.detach(),
                     {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})


def simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> PairTerms:
    """SimPO on per-token average log-probs: -log sigmoid(beta * (chosen - rejected) - gamma)."""
    logits = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return PairTerms(_smoothed_logsigmoid_loss(logits, label_smoothing), beta * chosen_mean_logps.detach(),
                     beta * rejected_mean_logps.detach())


@dataclasses.dataclass
class UnpairedTerms:
    """KTO's per-example losses [N] (weighted), rewards [N] (detached) and which examples are desirable."""

    losses: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor  # bool [N]


def kto_kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: the mean log-ratio on mismatched (prompt, completion) pairs, clamped at 0 and
    detached (the paper does not back-propagate through it)."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> UnpairedTerms:
    """KTO per example: desirable ones pay 1 - sigmoid(beta * (r - z)), undesirable 1 - sigmoid(beta * (z - r))."""
    logratios = logps - ref_logps
    desirable = desirable.bool()
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return UnpairedTerms(torch.where(desirable, chosen, rejected), beta * logratios.detach(), desirable)
