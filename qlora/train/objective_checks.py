"""Checks of the `objective` node and of what it needs from the rest of the recipe, made before the
model loads (schema.validate calls them), each naming the key and the fix."""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from qlora.train.schema import ConfigError

OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")  # qlora.objectives.OBJECTIVES, without importing torch here
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
_PAIR_FORMAT = "qlora.data.PreferenceFormat"
_UNPAIRED_FORMAT = "qlora.data.UnpairedFormat"
_FORMAT_ALIASES = {"qlora.data.preference.PreferenceFormat": _PAIR_FORMAT,
                   "qlora.data.preference.UnpairedFormat": _UNPAIRED_FORMAT}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_objective(cfg: DictConfig) -> None:
    o = cfg.get("objective")
    if o is None:
        return
    name = o.name
    if name not in OBJECTIVES:
        raise ConfigError(f"objective={name!r} is not one of {', '.join(OBJECTIVES)}; set objective=<one of them>")
    for key in ("beta", "orpo_lambda", "desirable_weight", "undesirable_weight"):
        if not (_finite(o[key]) and o[key] > 0):
            raise ConfigError(f"objective.{key} must be a finite number > 0, got {o[key]!r}")
    if not (_finite(o.gamma) and o.gamma >= 0):
        raise ConfigError(f"objective.gamma must be a finite number >= 0, got {o.gamma!r}")
    if not (_finite(o.sft_weight) and o.sft_weight >= 0):
        raise ConfigError(f"objective.sft_weight must be a finite number >= 0, got {o.sft_weight!r}")
    if o.sft_weight and name not in ("dpo", "simpo"):
        raise ConfigError(f"objective.sft_weight={o.sft_weight} adds the chosen NLL to DPO or SimPO; objective={name} "
                          f"{'has its own NLL term' if name == 'orpo' else 'has no chosen answers to imitate'}: set "
                          "objective.sft_weight=0")
    if o.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"objective.loss_type={o.loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    if o.loss_type != "sigmoid" and name != "dpo":
        raise ConfigError(f"objective.loss_type={o.loss_type} is a DPO variant; with objective={name} leave "
                          "objective.loss_type=sigmoid")
    if not (_finite(o.label_smoothing) and 0 <= o.label_smoothing < 0.5):
        raise ConfigError(f"objective.label_smoothing must be in [0, 0.5), got {o.label_smoothing!r}")
    if o.label_smoothing and not (name == "simpo" or (name == "dpo" and o.loss_type == "sigmoid")):
        raise ConfigError(f"objective.label_smoothing={o.label_smoothing} applies to objective=dpo with "
                          f"loss_type=sigmoid and to objective=simpo; set objective.label_smoothing=0")
    if o.precompute_reference and name not in ("dpo", "kto"):
        raise ConfigError(f"objective.precompute_reference=true: objective={name} has no reference model; "
                          "set objective.precompute_reference=false")
    _check_data(cfg, name)
    _check_adapter(cfg)


def _check_data(cfg: DictConfig, name: str) -> None:
    target = str(cfg.data.format.get("_target_", ""))
    target = _FORMAT_ALIASES.get(target, target)
    if name == "sft":
        if target == _UNPAIRED_FORMAT:
            raise ConfigError("objective=sft would train on KTO's undesirable completions too; set objective=kto, "
                              "or give SFT data (a PreferenceFormat source trains SFT on its chosen answers)")
        return
    wanted = (_PAIR_FORMAT, _UNPAIRED_FORMAT) if name == "kto" else (_PAIR_FORMAT,)
    if target not in wanted:
        raise ConfigError(f"objective={name} needs {' or '.join(wanted)} data, and data.format._target_ is "
                          f"{target}; set data.format._target_={wanted[-1]} (fields: "
                          f"{'prompt, completion, label' if wanted[-1] == _UNPAIRED_FORMAT else 'prompt, chosen, rejected'}"
                          f") or data=embedded_preferences")
    if cfg.data.packing:
        raise ConfigError(f"data.packing=true packs SFT examples; objective={name} scores whole sequences: set "
                          "data.packing=false")
    if cfg.trainer.chunked_loss:
        raise ConfigError(f"trainer.chunked_loss=true is the SFT loss's chunked form; objective={name} scores "
                          "log-probs from the logits: set trainer.chunked_loss=false")


def _check_adapter(cfg: DictConfig) -> None:
    adapter = cfg.model.get("adapter")
    if adapter is None:
        return
    path = Path(str(adapter)).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"model.adapter={adapter}: no adapter_config.json there; pass a PEFT adapter directory "
                          "(a run's adapter/ folder)")
    if cfg.lora.init != "default":
        raise ConfigError(f"model.adapter starts from trained weights, and lora.init={cfg.lora.init} initialises "
                          "new ones; set lora.init=default")
    if cfg.distributed.get("low_memory_load", False):
        raise ConfigError("model.adapter cannot be combined with distributed.low_memory_load=true (the adapter is "
                          "read onto the whole base before sharding); set distributed.low_memory_load=false")
