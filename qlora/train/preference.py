"""The trainer's side of the objectives (qlora.objectives): data, the starting adapter, the reference
log-probs precomputed once and kept beside the checkpoints, evaluation and the logged metrics.

Everything else the loop does (accumulation, clipping, the NaN guard, checkpoints, distributed
wrappers, offload) is the same code for every objective: only the loss terms and what normalises
them differ.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from qlora.errors import UserError
from qlora.objectives import (REFERENCE_ADAPTER, Objective, SFTObjective, Stats, build_objective,
                              evaluate_preferences, lookup_reference, precompute_reference)
from qlora.train import checkpoint as ckpt
from qlora.train.loss import token_loss_sum

# Functions here take the trainer (qlora.train.trainer.Trainer), which calls them: an annotation would
# import it back and make the two modules a circle.
log = logging.getLogger("qlora.train")

REFERENCE_FILE = "reference_logps.safetensors"  # in <run>/checkpoints/, beside the step folders
# Shown in the progress bar after the loss, for the objectives that log them.
_PROGRESS = ("rewards/accuracies", "rewards/margins", "kl", "nll_loss")

__all__ = ["Stats", "sft_objective", "objective_for", "step_totals", "loss_terms", "progress_fields"]


def sft_objective(cfg) -> Objective:
    return SFTObjective(token_loss_sum, cfg.trainer.chunked_loss, cfg.trainer.loss_chunk_size)


def objective_for(cfg) -> Objective:
    """The recipe's objective (SFT when the recipe has no `objective` node, as older run configs)."""
    if "objective" not in cfg or cfg.objective.name == "sft":
        return sft_objective(cfg)
    return build_objective(cfg)


def step_totals(objective: Objective, micro: list[dict], world) -> dict[str, float]:
    """The step's normalisers (pairs, tokens, examples), summed over its micro-batches and all ranks."""
    local: dict[str, float] = {}
    for batch in micro:
        for key, count in objective.counts(batch).items():
            local[key] = local.get(key, 0) + count
    return {key: world.sum(value) for key, value in local.items()}


def loss_terms(objective: Objective, model, batch: dict, stats: Stats) -> dict[str, torch.Tensor]:
    if objective.name == "sft":
        return objective.loss_terms(model, batch, stats)
    return objective.loss_terms(model, batch, stats, lookup_reference(objective, batch))


def progress_fields(record: dict) -> dict[str, str]:
    return {name: f"{record[name]:.3f}" for name in _PROGRESS if name in record}


# ---- data -------------------------------------------------------------------------------------------
def prepare_data(cfg, tokenizer, source: str, eval_source: Optional[str], format):
    """(train, eval) pairs or KTO examples, as `prepare_datasets` gives SFT examples."""
    from qlora.data.preference import prepare_preference_datasets

    d = cfg.data
    return prepare_preference_datasets(tokenizer, source=source, format=format, max_seq_len=d.max_seq_len,
                                       unpaired=cfg.objective.name == "kto", split=d.split, eval_source=eval_source,
                                       eval_fraction=d.eval_fraction, truncation=d.truncation, seed=d.seed)


def exact_match_examples(eval_data, count: int) -> list[dict]:
    """The first `count` held-out examples whose completion is a desired answer (KTO data also holds
    undesirable ones, which are no reference to match)."""
    rows = []
    has_label = "label" in eval_data.column_names
    for i in range(len(eval_data)):
        if len(rows) >= count:
            break
        row = eval_data[i]
        if not has_label or row["label"]:
            rows.append(row)
    return rows


# ---- the starting adapter -----------------------------------------------------------------------------
def load_starting_adapter(model, path: str, objective_name: str, gradient_checkpointing: bool):
    """The 4-bit model with the adapter at `path` as the trained adapter ("default"), and for DPO and KTO a
    second, frozen copy named "reference": the reference policy (PEFT multi-adapter)."""
    from peft import LoraConfig

    from qlora.lora import load_lora, register
    from qlora.objectives import REFERENCE_OBJECTIVES

    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    peft_model = load_lora(model, path, is_trainable=True)
    if objective_name in REFERENCE_OBJECTIVES:
        config = register(LoraConfig.from_pretrained(path))
        peft_model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False, config=config)
        peft_model.set_adapter("default")  # trained; the reference stays frozen
    return peft_model


# ---- reference log-probs, once ---------------------------------------------------------------------------
def _reference_key(trainer) -> dict:
    o = trainer.cfg.objective
    return {"objective": o.name, "examples": str(len(trainer.train_data)),
            "data": str(getattr(trainer.train_data, "_fingerprint", "")),
            "reference": str(trainer.cfg.model.get("adapter") or "base with the adapter disabled")}


def _read_reference(path: Path, key: dict) -> Optional[torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata() != key:
                log.warning("reference log-probs in %s were computed for other data or another reference (%s); "
                            "computing them again", path, json.dumps(handle.metadata()))
                return None
            return handle.get_tensor("logps")
    except Exception as err:  # a damaged file is recomputed, never trusted
        log.warning("reference log-probs in %s could not be read (%s); computing them again", path, err)
        return None


def _write_reference(path: Path, table: torch.Tensor, key: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    save_file({"logps": table.contiguous()}, str(staging), metadata=key)
    os.replace(staging, path)  # whole or absent, like a checkpoint


def prepare_reference(trainer, resume: Optional[Path]) -> None:
    """objective.precompute_reference: the reference log-probs of every training example, computed once
    (before the first step) and written beside the checkpoints; a resumed run reads them back."""
    objective, cfg = trainer.objective, trainer.cfg
    if objective.name == "sft" or not objective.needs_reference or not cfg.objective.precompute_reference:
        return
    key = _reference_key(trainer)
    own = ckpt.checkpoint_dir(trainer.run_dir) / REFERENCE_FILE
    table = _read_reference(Path(resume).parent / REFERENCE_FILE, key) if resume is not None else None
    table = table if table is not None else _read_reference(own, key)
    if table is not None:
        log.info("reference log-probs of %d examples read from the run's checkpoints", len(table))
    else:
        from qlora.distributed.data import to_device

        started = time.perf_counter()
        acc = trainer.accelerator
        table = precompute_reference(objective, trainer.model, trainer.train_data, trainer.collator,
                                     trainer.t.micro_batch_size, acc.device, acc.autocast,
                                     lambda batch: to_device(batch, acc.device))
        if not torch.isfinite(table).all():
            raise UserError("the reference log-probs hold NaN/inf: the base model's forward overflows on this "
                            "data; check quantization.compute_dtype (float32 avoids fp16 overflow) and the data")
        log.info("reference log-probs of %d examples computed in %.1f s", len(table), time.perf_counter() - started)
    if trainer.world.is_main and _read_reference(own, key) is None:
        _write_reference(own, table, key)
    objective.reference_table = table


# ---- evaluation --------------------------------------------------------------------------------------------
def evaluate(trainer, step: int) -> dict:
    """Held-out preference loss and reward metrics (eval_rewards/accuracies, ...), plus generated samples."""
    t = trainer.t
    results = evaluate_preferences(trainer.objective, trainer.model, trainer._loader(trainer.eval_data),
                                   t.eval_batches, trainer.accelerator.autocast)
    samples = [trainer.eval_data[i] for i in range(min(t.eval_samples, len(trainer.eval_data)))]
    if samples:
        from qlora.train.evaluation import generate

        outputs = generate(trainer.accelerator.unwrap_model(trainer.model), trainer.tokenizer,
                           [s["prompt"] for s in samples], t.max_new_tokens)
        trainer.metrics.log_text("samples", [{"prompt": s["prompt"], "generated": o} for s, o in zip(samples, outputs)],
                                 step)
    trainer.metrics.log(results, step)
    trainer.state.evals.append({"step": step, **results})
    shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in results.items()
                      if k in ("eval_rewards/accuracies", "eval_rewards/margins"))
    log.info("step %d: eval loss %.4f%s", step, results["eval_loss"], f", {shown}" if shown else "")
    return results
