"""Seconds-long training runs on the tiny model, shared by the LoftQ, baseline and eval tests."""
from pathlib import Path

import torch

from tiny_run import overrides


def train_tiny(assets, run_dir: Path, **extra) -> dict:
    """qlora.train.run on the tiny model and copy task (2 steps, no checkpoints); returns the summary."""
    from qlora.train.recipes import compose_recipe
    from qlora.train import run

    extra = {"trainer.max_steps": 2, "trainer.save_every": 0, "trainer.eval_every": 0, "lora.dropout": 0.0, **extra}
    cfg = compose_recipe([o for o in overrides(*assets, run_dir, **extra) if not o.startswith("hydra.")])
    return run(cfg, run_dir=run_dir)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).norm() / want.detach().double().norm())


@torch.no_grad()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()
