"""Compose a recipe from Python (notebooks, scripts, tests) exactly as train.py does."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from omegaconf import DictConfig

from qlora.train.schema import register, validate

# recipes/ sits beside the package in the repository (an editable install keeps it there).
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def compose_recipe(overrides: Iterable[str] = (), recipes_dir: Optional[Path] = None) -> DictConfig:
    """The validated config `python train.py <overrides>` would run with."""
    from hydra import compose, initialize_config_dir

    directory = Path(recipes_dir or RECIPES_DIR)
    if not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"no recipes at {directory}; pass recipes_dir=<the repository's recipes/ folder>")
    register()
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate(cfg)
    return cfg
