"""Training: the recipe schema, the trainer loop, checkpoints, evaluation and tracking.

    from qlora.train import compose_recipe, run
    summary = run(compose_recipe(["trainer.max_steps=50"]), run_dir="outputs/mine")

The loop itself lives in qlora.train.runner; `run` here is that function, imported lazily (it pulls
in the whole stack). No submodule is named `run`, so this name never becomes a module.
"""
from qlora.train.recipes import compose_recipe


def run(cfg, run_dir=None) -> dict:
    """Train as `cfg` says (see qlora.train.runner.run)."""
    from qlora.train.runner import run as _run

    return _run(cfg, run_dir)


__all__ = ["compose_recipe", "run"]
