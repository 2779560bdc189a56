"""The recipes (Hydra configs), installed as qlora.recipes so that a wheel composes them too."""
