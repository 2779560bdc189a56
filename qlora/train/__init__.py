"""Training: the recipe schema, the trainer loop, checkpoints, evaluation and tracking.

    from qlora.train import compose_recipe, run
    summary = run(compose_recipe(["trainer.max_steps=50"]), run_dir="outputs/mine")
"""
from qlora.train.recipes import compose_recipe


def run(cfg, run_dir=None) -> dict:
    """Train as `cfg` says (see qlora.train.run.run); imported lazily, it pulls in the whole stack."""
    from qlora.train.run import run as _run

    return _run(cfg, run_dir)


__all__ = ["compose_recipe", "run"]
