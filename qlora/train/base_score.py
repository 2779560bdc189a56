"""The base model's exact match, remembered: the score before training depends only on the base, its
format, the held-out prompts and the generation length, not on the run, so a second run of the same
base on the same prompts reads it back instead of generating again (two 100-prompt greedy passes took
125 s of a 133 s int8 run that trained for 8 s).

Only a run whose adapter starts as a no-op is remembered (LoRA's B is zero at the default init, so
the model computes the base's function): LoftQ rewrites the base and model.adapter starts elsewhere,
so those score again. The key covers the checkpoint's files (path, size, mtime), the model and
quantization recipe, the device type, the generation length and every prompt and reference. Entries
live in $QLORA_CACHE_DIR/base_scores (default ~/.cache/qlora/base_scores), one small JSON each.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf


def cache_dir() -> Path:
    root = os.environ.get("QLORA_CACHE_DIR") or Path.home() / ".cache" / "qlora"
    return Path(root).expanduser() / "base_scores"


def key(cfg, checkpoint: Path, device_type: str, examples: list[dict], max_new_tokens: int) -> Optional[str]:
    """The cache key of a run's before-training score, or None when it must not be remembered."""
    if cfg.lora.get("init", "default") != "default" or cfg.model.get("adapter"):
        return None
    checkpoint = Path(checkpoint)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint.iterdir() if p.is_file()) \
        if checkpoint.is_dir() else []
    described = {
        "checkpoint": str(checkpoint.resolve()), "files": files, "device": device_type, "max_new_tokens": max_new_tokens,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "quantization": OmegaConf.to_container(cfg.quantization, resolve=True),
        "examples": [[e["prompt"], e["completion"]] for e in examples],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def recall(entry: Optional[str]) -> Optional[float]:
    if entry is None:
        return None
    path = cache_dir() / f"{entry}.json"
    try:
        return float(json.loads(path.read_text())["exact_match"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: score again


def remember(entry: Optional[str], score: float) -> None:
    if entry is None:
        return
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staged = directory / f".{entry}.{os.getpid()}.tmp"
        staged.write_text(json.dumps({"exact_match": score}) + "\n")
        os.replace(staged, directory / f"{entry}.json")  # a reader never sees half an entry
    except OSError:
        pass  # a cache that cannot be written only costs the next run its generation pass
