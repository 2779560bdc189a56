"""Training objectives as the trainer sees them: SFT and the preference objectives (DPO, ORPO, SimPO, KTO).

An objective turns a micro-batch into loss *numerators* keyed by what normalises them ("tokens" for
SFT, "pairs" for DPO, "pairs" and "chosen_tokens" for ORPO, "examples" for KTO) and gives the
micro-batch's counts of each. The trainer sums the counts over the step's micro-batches and all
ranks first, then back-propagates numerator / step total: so a step's loss is the same mean
whatever the accumulation and world size, exactly as the SFT loss is normalised by the step's
supervised tokens (DESIGN.md §4).

The reference policy is never a second model. With a fresh adapter it is the same 4-bit base with
the adapter switched off (PEFT's `disable_adapter()`); when training continues from an adapter
(`model.adapter=<path>`), that adapter is loaded a second time, frozen, as the PEFT adapter
"reference", and the reference forward makes it the active one. Reference forwards run without
gradients and in eval mode: LoRA dropout on a frozen reference adapter would make it a random
target, and no RNG is drawn, so a resumed run replays the same dropout masks.
"""
from __future__ import annotations

import abc
import contextlib
import logging
from collections import defaultdict
from typing import Any, Optional

import torch
from torch import nn

from qlora.data.collate import Collator, count_supervised_tokens
from qlora.data.preference import PairCollator, UnpairedCollator, batch_view
from qlora.data.tokenization import IGNORE_INDEX
from qlora.objectives import losses as L

log = logging.getLogger("qlora.train")

REFERENCE_ADAPTER = "reference"  # the PEFT adapter name of a frozen starting adapter
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")
REFERENCE_OBJECTIVES = ("dpo", "kto")  # the ones that compare against a reference policy


def peft_model_of(model: nn.Module):
    """The PeftModel under DDP / accelerate wrappers (FSDP2 shards the module in place)."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, PeftModel):
        raise TypeError(f"the preference objectives need a PEFT model (the reference is the base with the adapter "
                        f"off), got {type(model).__name__}")
    return model


@contextlib.contextmanager
def reference_policy(model: nn.Module):
    """The reference for the forwards inside: the frozen "reference" adapter if there is one, else the base
    with the adapter disabled; eval mode, no gradients. Everything is restored on exit."""
    peft = peft_model_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if REFERENCE_ADAPTER in peft.peft_config:
                trained = peft.active_adapter
                # inference_mode keeps both frozen while the reference is active; switching back to the
                # trained adapter makes its weights require grad again (PEFT's set_adapter does both).
                peft.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
                try:
                    yield
                finally:
                    peft.set_adapter(trained)
            else:
                with peft.disable_adapter():
                    yield
    finally:
        model.train(was_training)


def completion_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(token) over each row's supervised tokens [R], in fp32 or wider, their count [R])."""
    view = batch_view(batch)
    logits = model(**{k: v for k, v in view.items() if k != "labels"}).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; fp64 stays (tests)
    labels = view["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(mask, picked - logits.logsumexp(-1), torch.zeros((), device=picked.device))
    return token_logps.sum(-1), mask.sum(-1)


class Stats:
    """Metric sums and their counts over a step (or an evaluation): means come out after summing over ranks."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] += float(values.detach().float().sum())
        self.counts[name] += values.numel()

    def means(self, reduce=lambda value: value) -> dict[str, float]:
        """{name: mean}; `reduce` sums a float over ranks (World.sum) when distributed."""
        out = {}
        for name in sorted(self.sums):
            count = reduce(self.counts[name])
            if count:
                out[name] = reduce(self.sums[name]) / count
        if "rewards/chosen" in out and "rewards/rejected" in out and "rewards/margins" not in self.sums:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]  # KTO: unpaired means
        return out


class Objective(abc.ABC):
    """What the trainer asks of every objective. `counts` and `loss_terms` share their keys."""

    name = "sft"
    needs_reference = False
    reference_width = 0  # reference log-probs stored per example when precomputed

    def collator(self, pad_token_id: int):
        return Collator(pad_token_id)

    @abc.abstractmethod
    def counts(self, batch: dict) -> dict[str, int]:
        """The micro-batch's normalisers: {"tokens" | "pairs" | "chosen_tokens" | "examples": count}."""

    @abc.abstractmethod
    def loss_terms(self, model: nn.Module, batch: dict, stats: Optional[Stats] = None) -> dict[str, torch.Tensor]:
        """The loss numerators under the same keys (sums: the trainer divides by the step's totals)."""


class SFTObjective(Objective):
    """Next-token cross-entropy summed over supervised tokens (qlora.train.loss), per supervised token."""

    def __init__(self, loss_sum, chunked: bool = False, chunk_size: Optional[int] = None):
        self.loss_sum, self.chunked, self.chunk_size = loss_sum, chunked, chunk_size

    def counts(self, batch):
        return {"tokens": count_supervised_tokens(batch["labels"])}

    def loss_terms(self, model, batch, stats=None):
        extra = {}
        loss, count = self.loss_sum(model, batch, self.chunked, self.chunk_size, extra=extra)
        aux = extra.get("router_aux_loss")
        if aux is not None:
            # A mixture of experts whose config asks for the load-balancing loss (output_router_logits):
            # coef * aux per micro-batch, weighted by its supervised tokens like the cross-entropy, so
            # the step's loss is the token-weighted mean of both. Logged on its own, unweighted.
            coef = float(getattr(_config_of(model), "router_aux_loss_coef", 0.0) or 0.0)
            loss = loss + coef * aux.float() * count
            if stats is not None:
                stats.sums["router_aux_loss"] += float(aux.detach()) * count
                stats.counts["router_aux_loss"] += count
        return {"tokens": loss}


class PreferenceObjective(Objective):
    """DPO / ORPO / SimPO on pairs. Batches hold B chosen rows then B rejected rows (PairCollator)."""

    reference_width = 2

    def __init__(self, name: str, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 orpo_lambda: float = 0.1, gamma: float = 0.5, sft_weight: float = 0.0):
        self.name, self.beta, self.loss_type, self.label_smoothing = name, beta, loss_type, label_smoothing
        self.orpo_lambda, self.gamma = orpo_lambda, gamma
        # The chosen NLL's weight: ORPO's own term (weight 1), or DPO/SimPO's optional one (RPO).
        self.nll_weight = 1.0 if name == "orpo" else sft_weight
        self.needs_reference = name == "dpo"
        self.reference_table: Optional[torch.Tensor] = None  # [examples, 2] when precomputed

    def collator(self, pad_token_id):
        return PairCollator(pad_token_id)

    def counts(self, batch):
        pairs = int(batch["example_index"].numel())
        if self.nll_weight:
            chosen_labels = batch["labels"][:pairs, 1:]
            return {"pairs": pairs, "chosen_tokens": int((chosen_labels != IGNORE_INDEX).sum())}
        return {"pairs": pairs}

    def reference_logps(self, model, batch) -> torch.Tensor:
        """[B, 2] reference log-probs (chosen, rejected) of the batch's pairs."""
        with reference_policy(model):
            logps, _ = completion_logps(model, batch)
        return torch.stack(logps.chunk(2), dim=1)

    def loss_terms(self, model, batch, stats=None, reference: Optional[torch.Tensor] = None):
        stats = stats if stats is not None else Stats()
        logps, tokens = completion_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        terms = {}
        if self.name == "dpo":
            if reference is None:
                reference = self.reference_logps(model, batch)
            pair = L.dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], beta=self.beta,
                              loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                              chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
            shown_chosen, shown_rejected = chosen, rejected
        else:  # ORPO and SimPO score per-token average log-probs
            chosen_mean = chosen / chosen_tokens.clamp(min=1)
            rejected_mean = rejected / rejected_tokens.clamp(min=1)
            if self.name == "orpo":
                pair = L.orpo_odds_ratio(chosen_mean, rejected_mean, orpo_lambda=self.orpo_lambda)
            else:
                pair = L.simpo_loss(chosen_mean, rejected_mean, beta=self.beta, gamma=self.gamma,
                                    label_smoothing=self.label_smoothing)
            shown_chosen, shown_rejected = chosen_mean, rejected_mean
        terms["pairs"] = pair.losses.sum()
        if self.nll_weight:  # summed over chosen tokens; the trainer divides by the step's chosen tokens
            nll = -chosen.sum()
            terms["chosen_tokens"] = self.nll_weight * nll
            stats.sums["nll_loss"] += float(nll.detach())
            stats.counts["nll_loss"] += float(chosen_tokens.sum())
        record_pairs(stats, pair, shown_chosen, shown_rejected)
        return terms


def record_pairs(stats: Stats, pair: L.PairTerms, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> None:
    """The metrics TRL logs for pairs, under its names."""
    stats.add("rewards/chosen", pair.chosen_rewards)
    stats.add("rewards/rejected", pair.rejected_rewards)
    stats.add("rewards/accuracies", (pair.chosen_rewards > pair.rejected_rewards).float())
    stats.add("rewards/margins", pair.chosen_rewards - pair.rejected_rewards)
    stats.add("logps/chosen", chosen_logps)
    stats.add("logps/rejected", rejected_logps)
    for name, values in pair.extra.items():
        stats.add(name, values)


class KTOObjective(Objective):
    """KTO on unpaired examples; the reference point z is estimated on each micro-batch's mismatched
    (prompt, next example's completion) sequences, which UnpairedCollator builds."""

    name = "kto"
    needs_reference = True
    reference_width = 2  # the example's reference log-prob and its mismatched sequence's

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.reference_table: Optional[torch.Tensor] = None

    def collator(self, pad_token_id):
        return UnpairedCollator(pad_token_id)

    def counts(self, batch):
        return {"examples": int(batch["desirable"].numel())}

    def reference_logps(self, model, batch) -> torch.Tensor:
        with reference_policy(model):
            logps, _ = completion_logps(model, batch)
            kl_logps, _ = completion_logps(model, batch_view(batch, "kl_"))
        return torch.stack([logps, kl_logps], dim=1)

    def loss_terms(self, model, batch, stats=None, reference: Optional[torch.Tensor] = None):
        stats = stats if stats is not None else Stats()
        if reference is None:
            reference = self.reference_logps(model, batch)
        with torch.no_grad():  # z is detached: the mismatched policy forward needs no graph
            kl_logps, _ = completion_logps(model, batch_view(batch, "kl_"))
        kl = L.kto_kl_estimate(kl_logps, reference[:, 1])
        logps, _ = completion_logps(model, batch)
        terms = L.kto_loss(logps, reference[:, 0], batch["desirable"], kl, beta=self.beta,
                           desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        desirable = terms.desirable
        stats.add("rewards/chosen", terms.rewards[desirable])
        stats.add("rewards/rejected", terms.rewards[~desirable])
        stats.add("logps/chosen", logps.detach()[desirable])
        stats.add("logps/rejected", logps.detach()[~desirable])
        stats.add("kl", kl.reshape(1))
        return {"examples": terms.losses.sum()}


def _config_of(model):
    """The transformers config under the DDP and PEFT wrappers."""
    model = getattr(model, "module", model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(model, "config", None)


def build_objective(cfg, loss_sum=None) -> Objective:
    """The recipe's `objective` node as an Objective (`loss_sum`: SFT's token loss, qlora.train.loss)."""
    o = cfg.objective
    if o.name == "sft":
        return SFTObjective(loss_sum, cfg.trainer.chunked_loss, cfg.trainer.loss_chunk_size)
    if o.name == "kto":
        return KTOObjective(o.beta, o.desirable_weight, o.undesirable_weight)
    return PreferenceObjective(o.name, o.beta, o.loss_type, o.label_smoothing, o.orpo_lambda, o.gamma,
                               o.get("sft_weight", 0.0))


def lookup_reference(objective: Objective, batch: dict) -> Optional[torch.Tensor]:
    """The precomputed reference rows of a training batch, or None (computed live)."""
    table = getattr(objective, "reference_table", None)
    if table is None:
        return None
    index = batch["example_index"]
    return table.index_select(0, index.cpu()).to(index.device)


@torch.no_grad()
def precompute_reference(objective: Objective, model: nn.Module, dataset, collator, batch_size: int, device,
                         autocast=contextlib.nullcontext, to_device=None) -> torch.Tensor:
    """[examples, reference_width] reference log-probs over `dataset`, in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    table = torch.zeros(len(dataset), objective.reference_width, dtype=torch.float32)
    for batch in loader:
        batch = to_device(batch) if to_device else {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                                    for k, v in batch.items()}
        with autocast():
            values = objective.reference_logps(model, batch)
        table[batch["example_index"].cpu()] = values.float().cpu()
    return table


@torch.no_grad()
def evaluate_preferences(objective: Objective, model: nn.Module, loader, max_batches: int = 0,
                         autocast=contextlib.nullcontext) -> dict[str, Any]:
    """Held-out loss and TRL's reward metrics, named eval_<metric> as TRL names them."""
    was_training = model.training
    model.eval()
    stats, numerators, totals = Stats(), defaultdict(float), defaultdict(float)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        with autocast():
            terms = objective.loss_terms(model, batch, stats)
        for key, count in objective.counts(batch).items():
            totals[key] += count
            numerators[key] += float(terms[key])
    model.train(was_training)
    results = {f"eval_{k}": v for k, v in stats.means().items()}
    results["eval_loss"] = sum(numerators[k] / max(totals[k], 1) for k in totals)
    results["eval_pairs" if objective.name != "kto" else "eval_examples"] = int(
        totals.get("pairs", totals.get("examples", 0)))
    return results
