"""The trainer's state: what a checkpoint records so that a resumed run continues step for step."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps count: they consumed their batches)
    epoch: int = 0  # data epoch the next micro-batch comes from
    batch: int = 0  # micro-batches already drawn from that epoch
    tokens: int = 0  # tokens seen (attention-mask ones)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"step", "loss"} per step
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"step", "eval_loss", ...}
    train_seconds: float = 0.0  # time in the training loop, summed over resumed runs
    exact_match_before: Optional[float] = None  # scored once, before the first step
    nonfinite_skips: int = 0  # consecutive steps dropped for non-finite gradients (trainer.nonfinite=skip)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainerState":
        """Fields this version knows; a checkpoint from an older version lacks some and keeps defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
