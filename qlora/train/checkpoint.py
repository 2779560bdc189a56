"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, atomic, rotated.

A checkpoint is a folder `checkpoints/step-000120/` that is written under a temporary name and
renamed into place only when complete, so a crash mid-save leaves the previous one intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        model.save_pretrained(staging / "adapter")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_state(), staging / "rng.pt")
        (staging / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints that finished writing, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def find_resume_checkpoint(resume, run_dir: Path) -> Optional[Path]:
    """The checkpoint `trainer.resume` points at: a path, or (true) the newest complete checkpoint
    among this run name's earlier runs (sibling folders of run_dir)."""
    if resume in (False, None, "false", "False"):
        return None
    if resume not in (True, "true", "True"):
        path = Path(str(resume))
        if (path / STATE_FILE).is_file():
            return path
        newest = complete_checkpoints(checkpoint_dir(path)) or complete_checkpoints(path)
        if newest:
            return newest[-1]
        raise FileNotFoundError(f"trainer.resume={resume}: no complete checkpoint there (looked for {STATE_FILE})")
    candidates = []
    for sibling in run_dir.parent.iterdir() if run_dir.parent.is_dir() else []:
        candidates += complete_checkpoints(checkpoint_dir(sibling))
    if not candidates:
        raise FileNotFoundError(
            f"trainer.resume=true: no complete checkpoint under {run_dir.parent}/*/checkpoints; "
            "start without resume, or pass trainer.resume=<checkpoint path>"
        )
    return max(candidates, key=lambda p: (int(p.name[len(_PREFIX):]), p.stat().st_mtime))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; returns the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"checkpoint {path} does not match the model's adapters: {result.unexpected_keys[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
