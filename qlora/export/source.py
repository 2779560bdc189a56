"""Where an adapter came from: its directory, the run that trained it, the base and its quantization.

A run directory written by qlora.train.run holds `config.yaml` (the resolved recipe: model path,
quantization settings) and `adapter/`; a bare PEFT adapter directory holds only
`adapter_config.json`, whose `base_model_name_or_path` names the base. Both are accepted.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from qlora.config import QuantConfig

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"


@dataclasses.dataclass
class AdapterSource:
    adapter_dir: Path
    run_dir: Optional[Path]            # the training run, when the adapter sits inside one
    base: str                          # the base checkpoint: local path or Hub id
    qconfig: QuantConfig               # how the base was quantized for training
    qconfig_known: bool                # False: no run config, QuantConfig defaults were assumed
    dense_dtype: Optional[torch.dtype]  # dtype training gave the dense (non-4-bit) layers
    revision: Optional[str] = None
    trust_remote_code: bool = False

    def adapter_config(self) -> dict:
        return json.loads((self.adapter_dir / ADAPTER_CONFIG).read_text())


def find_adapter_dir(path: str | Path) -> Path:
    """The adapter directory of `path`: itself, or `path/adapter` for a run directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a directory; pass a training run directory "
                                "(outputs/<run>/<date_time>) or a PEFT adapter directory")
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / "adapter" / ADAPTER_CONFIG).is_file():
        return path / "adapter"
    checkpoints = sorted((path / "checkpoints").glob("step-*/adapter")) if (path / "checkpoints").is_dir() else []
    hint = (f"; the run has no final adapter (it may not have finished), but a checkpoint does: pass "
            f"{checkpoints[-1]}" if checkpoints else "; did the training run finish?")
    raise FileNotFoundError(f"no adapter in {path}: expected {ADAPTER_CONFIG} there or in {path / 'adapter'}{hint}")


def _find_run_dir(adapter_dir: Path) -> Optional[Path]:
    # adapter/ sits in the run dir; checkpoints/step-N/adapter/ three levels below it.
    for candidate in (adapter_dir.parent, adapter_dir.parent.parent.parent):
        if (candidate / RUN_CONFIG).is_file():
            return candidate
    return None


def _resolve_model_path(name: str) -> str:
    if name == "embedded":
        from qlora.embedded import BASE_MODEL_DIR

        return str(BASE_MODEL_DIR)
    return name


def resolve_source(run_or_adapter_dir: str | Path, base_model: Optional[str] = None) -> AdapterSource:
    """Read the adapter and, when there is one, its run's config. `base_model` overrides the base path."""
    adapter_dir = find_adapter_dir(run_or_adapter_dir)
    run_dir = _find_run_dir(adapter_dir)
    adapter_cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir} holds a {adapter_cfg.get('peft_type')} adapter; qlora merges LoRA adapters only")
    if run_dir is not None:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / RUN_CONFIG)
        q = cfg.quantization
        qconfig = QuantConfig(quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=q.compute_dtype,
                              blocksize=q.blocksize, quant_storage=q.quant_storage,
                              skip_modules=list(q.skip_modules) if q.get("skip_modules") is not None else None)
        dtype_name = cfg.model.get("dtype")
        base = base_model or _resolve_model_path(cfg.model.name_or_path)
        if q.get("method", "bitsandbytes") == "gptq" and base_model is None:  # the GPTQ checkpoint it trained on
            from qlora.quant.gptq_cache import gptq_base

            base = gptq_base(base, OmegaConf.to_container(q.gptq), create=False)
        return AdapterSource(
            adapter_dir=adapter_dir, run_dir=run_dir, base=base,
            qconfig=qconfig, qconfig_known=True, dense_dtype=getattr(torch, dtype_name) if dtype_name else None,
            revision=cfg.model.get("revision"), trust_remote_code=bool(cfg.model.get("trust_remote_code", False)),
        )
    base = base_model or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path and there is no run "
                         f"{RUN_CONFIG} next to it; pass the base checkpoint explicitly")
    logger.warning("no run %s found for %s: assuming the default quantization (NF4, double quant, blocksize 64) "
                   "unless the base checkpoint is pre-quantized", RUN_CONFIG, adapter_dir)
    return AdapterSource(adapter_dir=adapter_dir, run_dir=None, base=_resolve_model_path(base), qconfig=QuantConfig(),
                         qconfig_known=False, dense_dtype=None, revision=adapter_cfg.get("revision"))
