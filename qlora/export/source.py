"""Where an adapter came from: its directory, the run that trained it, the base and its quantization.

A run directory written by qlora.train.runner holds `config.yaml` (the resolved recipe: model path,
quantization settings) and `adapter/`; a bare PEFT adapter directory holds only
`adapter_config.json`, whose `base_model_name_or_path` names the base. Both are accepted.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from qlora.quant.nf4.config import QuantConfig
from qlora.errors import InputPathError, OptionError
from qlora.train.recipes import dense_dtype, model_path, quant_config

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"


@dataclasses.dataclass
class AdapterSource:
    adapter_dir: Path
    run_dir: Optional[Path]            # the training run, when the adapter sits inside one
    base: str                          # the base checkpoint: local path or Hub id
    qconfig: Any                       # how the base was quantized for training (QuantConfig, Int8Config, ...)
    qconfig_known: bool                # False: no run config, QuantConfig defaults were assumed
    dense_dtype: Optional[torch.dtype]  # dtype training gave the dense (non-4-bit) layers
    revision: Optional[str] = None
    trust_remote_code: bool = False
    quantized: bool = True             # False: trained with quantization=none, on the 16-bit base itself
    quantize_vision_tower: bool = False  # a vision-language base's vision side was quantized too (model.*)

    def adapter_config(self) -> dict:
        return json.loads((self.adapter_dir / ADAPTER_CONFIG).read_text())


def find_adapter_dir(path: str | Path, option: str = "run_dir") -> Path:
    """The adapter directory of `path`: itself, or `path/adapter` for a run directory. `option` is
    the name the error messages give the path (the CLI key)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputPathError(f"{option}={path} does not exist or is not a directory; pass a training run directory "
                             "(outputs/<run>/<date_time>) or a PEFT adapter directory")
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / "adapter" / ADAPTER_CONFIG).is_file():
        return path / "adapter"
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise InputPathError(f"{option}={path} holds a GGUF file ({ggufs[0].name}), which qlora does not read; "
                             "use it with llama.cpp, or pass a run directory or a format=hf/nf4 export")
    runs = sorted((p for p in path.iterdir() if (p / RUN_CONFIG).is_file() and p.is_dir()), key=lambda p: p.name)
    if runs:
        raise InputPathError(f"{option}={path} holds {len(runs)} training run(s), not one; pass one of them, e.g. "
                             f"{option}={runs[-1]} (the newest)")
    checkpoints = sorted((path / "checkpoints").glob("step-*/adapter")) if (path / "checkpoints").is_dir() else []
    hint = (f"; the run has no final adapter (it may not have finished), but a checkpoint does: pass "
            f"{option}={checkpoints[-1]}" if checkpoints else "; did the training run finish?")
    raise InputPathError(f"{option}={path}: no adapter there (expected {ADAPTER_CONFIG} in it or in "
                         f"{path / 'adapter'}){hint}")


def verify_adapter(adapter_dir: Path) -> None:
    """Check the adapter against its manifest (its own, or its checkpoint's); a damaged one is refused."""
    from qlora.train.checkpoint import EDITABLE_CONFIGS, MANIFEST_FILE, CheckpointError, verify

    for folder in (adapter_dir, adapter_dir.parent):
        if (folder / MANIFEST_FILE).is_file():
            problem = verify(folder)
            if problem is not None and problem.startswith(tuple(EDITABLE_CONFIGS)):  # an edit, not damage
                raise CheckpointError(f"adapter {adapter_dir} cannot be used as it is: {problem}")
            if problem is not None:
                raise CheckpointError(f"adapter {adapter_dir} is damaged: {problem}; use another checkpoint or "
                                      "re-run the training")
            return


def _find_run_dir(adapter_dir: Path) -> Optional[Path]:
    # adapter/ sits in the run dir; checkpoints/step-N/adapter/ three levels below it.
    for candidate in (adapter_dir.parent, adapter_dir.parent.parent.parent):
        if (candidate / RUN_CONFIG).is_file():
            return candidate
    return None


def resolve_source(run_or_adapter_dir: str | Path, base_model: Optional[str] = None,
                   option: str = "run_dir") -> AdapterSource:
    """Read the adapter and, when there is one, its run's config. `base_model` overrides the base path."""
    adapter_dir = find_adapter_dir(run_or_adapter_dir, option)
    verify_adapter(adapter_dir)
    run_dir = _find_run_dir(adapter_dir)
    adapter_cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise OptionError(f"{adapter_dir} holds a {adapter_cfg.get('peft_type')} adapter; qlora merges LoRA adapters only")
    if run_dir is not None:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / RUN_CONFIG)
        q = OmegaConf.to_container(cfg.quantization, resolve=True)
        quantized = q["quant_type"] != "none"
        if not quantized:  # a 16-bit LoRA run: the qconfig is a placeholder nothing reads
            q["quant_type"] = "nf4"
        from qlora.loftq import run_base_dir

        # A LoftQ run trained against its own quantized base (saved with the run), not against Q(W).
        base = base_model or run_base_dir(run_dir) or model_path(cfg.model.name_or_path)
        if q.get("method", "bitsandbytes") == "gptq" and base_model is None:  # the GPTQ checkpoint it trained on
            from qlora.models.gptq_base import gptq_base

            base = gptq_base(base, q["gptq"], create=False)
        return AdapterSource(
            adapter_dir=adapter_dir, run_dir=run_dir, base=str(base),
            qconfig=quant_config(q), qconfig_known=True, dense_dtype=dense_dtype(cfg.model),
            revision=cfg.model.get("revision"), trust_remote_code=bool(cfg.model.get("trust_remote_code", False)),
            quantized=quantized, quantize_vision_tower=bool(cfg.model.get("quantize_vision_tower", False)),
        )
    base = base_model or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise OptionError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path and there is no run "
                         f"{RUN_CONFIG} next to it; pass the base checkpoint explicitly")
    logger.warning("no run %s found for %s: assuming the default quantization (NF4, double quant, blocksize 64) "
                   "unless the base checkpoint is pre-quantized", RUN_CONFIG, adapter_dir)
    return AdapterSource(adapter_dir=adapter_dir, run_dir=None, base=model_path(base), qconfig=QuantConfig(),
                         qconfig_known=False, dense_dtype=None, revision=adapter_cfg.get("revision"))
