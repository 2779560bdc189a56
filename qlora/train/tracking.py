"""Metrics: always a metrics.jsonl in the run directory; optionally wandb (offline without a key)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: DictConfig):
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self._wandb = None
        if cfg.logger.backend == "wandb":
            self._wandb = _start_wandb(run_dir, cfg)

    def log(self, metrics: dict, step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_text(self, key: str, rows: list[dict], step: int) -> None:
        self._file.write(json.dumps({"step": step, key: rows}) + "\n")
        if self._wandb is not None:
            import wandb

            columns = list(rows[0]) if rows else []
            self._wandb.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step)

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self, failed: bool = False) -> None:
        self._file.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish(exit_code=1 if failed else 0)
            # finish() returns before wandb's service has written the run file: offline, the .wandb file
            # right after finish() held only its 7-byte header, and was complete 1-3 s later. teardown()
            # waits for the service, so the run folder is whole when training returns (a `wandb sync`
            # in the next notebook cell uploads everything); the next wandb.init starts a new service.
            wandb.teardown()

    @property
    def wandb_dir(self) -> Optional[str]:
        return None if self._wandb is None else self._wandb.dir


def _wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    import wandb

    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = bool(wandb.api.api_key)
        except Exception:  # no netrc, no settings: no key
            has_key = False
    return "online" if has_key else "offline"


def _start_wandb(run_dir: Path, cfg: DictConfig):
    import wandb

    mode = _wandb_mode(cfg.logger.mode)
    if mode == "offline":
        print(f"wandb: no API key, logging offline to {run_dir / 'wandb'} (upload later with `wandb sync`)")
    return wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=f"{cfg.trainer.run_name}/{run_dir.name}",
        dir=str(run_dir),
        mode=mode,
        tags=list(cfg.logger.tags),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
