"""Training checkpoints: adapter + optimizer + scheduler + RNG + trainer state, staged, verified, rotated.

A checkpoint is a folder `checkpoints/step-000120/` written through `qlora.staging` (built under a
temporary name, swapped into place when complete). Its last file is `manifest.json`: every other
file's size and sha256. Resume verifies the newest checkpoint against its manifest and falls back
to the newest intact one, naming the damaged one. Nothing is pickled: the optimizer, scheduler and
RNG states are safetensors + JSON (`state_io`), so loading a shared checkpoint runs no code.
Checkpoints of the earlier layout (`optimizer.pt`, ...) load through torch.load(weights_only=True)
with an explicit allowlist, or are refused naming the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from qlora.errors import UserError
from qlora.staging import staged_directory
from qlora.train.state import TrainerState
from qlora.train.state_io import load_state, save_state

log = logging.getLogger("qlora.train")

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
_PREFIX = "step-"
_LEGACY_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")


class CheckpointError(UserError, ValueError):
    """A checkpoint that is damaged, incomplete, refused, or that does not match the model."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name[len(_PREFIX):])


# ---- RNG -------------------------------------------------------------------------------------
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


# ---- manifest --------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> Path:
    """Record every file under `directory` (size, sha256); written last, it marks the folder complete."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    for name, entry in entries.items():  # what an edit of a config file is compared with (see verify)
        if Path(name).name in EDITABLE_CONFIGS:
            entry["json"] = json.loads((directory / name).read_text())
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")
    return path


# Files users edit by hand and that training only records: an edit that leaves the adapter's shape
# as the weights have it is a note, not damage (moving the base changes base_model_name_or_path).
EDITABLE_CONFIGS = {"adapter_config.json"}
# The adapter_config.json keys that decide which tensors the weights hold and how they combine.
ADAPTER_SHAPE_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora",
                      "use_rslora", "fan_in_fan_out", "modules_to_save", "layers_to_transform", "target_parameters")


def verify(directory: Path) -> Optional[str]:
    """None if every file of the manifest is there with its size and hash (or is a config edited
    within the adapter's shape, logged as a note); else what is wrong."""
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        return f"no {MANIFEST_FILE} (the write did not finish)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err})"
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size == expected["size"] and _sha256(path) == expected["sha256"]:
            continue
        if Path(name).name in EDITABLE_CONFIGS:
            problem, note = _edited_config(path, expected.get("json"))
            if problem is None:
                log.warning("%s was edited after training (%s); the adapter's shape is unchanged, so it is used",
                            path, note)
                continue
            return problem
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        return f"{name} does not match its sha256 in the manifest"
    return None


def _lora_ranks(weights: Path) -> set[int]:
    """The ranks of the LoRA A matrices in an adapter's safetensors file (its header only)."""
    from safetensors import safe_open

    if not weights.is_file():
        return set()
    with safe_open(str(weights), framework="pt") as f:
        return {f.get_slice(k).get_shape()[0] for k in f.keys() if ".lora_A." in k and k.endswith(".weight")}


def _edited_config(path: Path, recorded: Optional[dict]) -> tuple[Optional[str], str]:
    """(problem or None, what changed) of a config file whose bytes differ from what training wrote."""
    try:
        edited = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"{path.name} is not valid JSON any more ({err}); restore it, e.g. from a checkpoint's adapter/", ""
    if not isinstance(edited, dict):
        return f"{path.name} is not a JSON object any more; restore it, e.g. from a checkpoint's adapter/", ""
    if recorded is None:  # written before configs were recorded: the ranks the weights hold must still fit
        ranks = _lora_ranks(path.parent / "adapter_model.safetensors")
        allowed = {edited.get("r")} | set((edited.get("rank_pattern") or {}).values())
        if ranks - allowed:
            return (f"{path.name} says r={edited.get('r')} but the weights have rank {sorted(ranks)}; set r back to "
                    "what the adapter was trained with"), ""
        return None, "its manifest predates recorded configs, so what changed is not known; the rank matches"
    changed = sorted(k for k in set(edited) | set(recorded) if edited.get(k) != recorded.get(k))
    shape = [k for k in changed if k in ADAPTER_SHAPE_KEYS]
    if shape:
        details = ", ".join(f"{k} {recorded.get(k)!r} -> {edited.get(k)!r}" for k in shape)
        return (f"{path.name} was edited in keys that no longer match the trained weights ({details}); set them "
                "back to the recorded values"), ""
    return None, "changed: " + ", ".join(f"{k} {recorded.get(k)!r} -> {edited.get(k)!r}" for k in changed)


def _is_legacy(path: Path) -> bool:
    return not (path / MANIFEST_FILE).exists() and (path / STATE_FILE).is_file() and (path / "optimizer.pt").is_file()


# ---- finiteness ------------------------------------------------------------------------------
def first_nonfinite(model, optimizer) -> Optional[str]:
    """The name of the first trainable weight or optimizer state tensor holding NaN/inf, or None."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            return name
    inner = getattr(optimizer, "optimizer", optimizer)
    for index, values in enumerate(inner.state.values()):
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"optimizer state {key} of parameter {index}"
    return None


# ---- write -----------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, write_adapter: Callable[[Path], None], optimizer, scheduler,
                    state: TrainerState, keep_last: int) -> Path:
    """Write checkpoint `step` (staged, ends with its manifest) and delete all but the newest `keep_last`.
    `write_adapter(folder)` writes the adapter (PEFT's save_pretrained and what goes with it)."""
    root = checkpoint_dir(run_dir)
    final = root / f"{_PREFIX}{step:06d}"
    with staged_directory(final) as staging:
        write_adapter(staging / "adapter")
        save_state(optimizer.state_dict(), staging, "optimizer")
        save_state(scheduler.state_dict(), staging, "scheduler")
        save_state(rng_state(), staging, "rng")
        (staging / STATE_FILE).write_text(json.dumps({**state.to_dict(), "step": step}, indent=2))
        write_manifest(staging)
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints that finished writing (a manifest, or a legacy state file), oldest first. Not verified."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
             and ((p / MANIFEST_FILE).is_file() or _is_legacy(p))]
    return sorted(found, key=step_of)


def intact_checkpoints(root: Path) -> list[Path]:
    """complete_checkpoints that also match their manifest, oldest first."""
    return [p for p in complete_checkpoints(root) if _is_legacy(p) or verify(p) is None]


# ---- resume ----------------------------------------------------------------------------------
def written_at(path: Path) -> float:
    """When a checkpoint was finished: its manifest is written last (a legacy one: its state file)."""
    for name in (MANIFEST_FILE, STATE_FILE):
        if (path / name).is_file():
            return (path / name).stat().st_mtime
    return path.stat().st_mtime


def _first_intact(candidates: list[Path], what: str) -> Path:
    """The newest candidate that verifies, newest by when it was written (across the runs of one name,
    the highest step may be an older experiment's); logs each damaged one it passes over."""
    damaged = []
    for path in sorted(candidates, key=lambda p: (written_at(p), step_of(p)), reverse=True):
        problem = None if _is_legacy(path) else verify(path)
        if problem is None:
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path
        log.warning("checkpoint %s is damaged: %s; falling back to an older one", path, problem)
        damaged.append(f"{path} ({problem})")
    if damaged:
        raise CheckpointError(f"{what}: no intact checkpoint; damaged: {'; '.join(damaged)}. Start without "
                              "trainer.resume, or pass trainer.resume=<an intact checkpoint>")
    raise CheckpointError(f"{what}: no complete checkpoint found; start without trainer.resume, or pass "
                          "trainer.resume=<checkpoint path>")


def _all_step_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]


def find_resume_checkpoint(resume, run_dir: Path) -> Optional[Path]:
    """The checkpoint `trainer.resume` points at: a checkpoint path (used only if intact), a run folder
    (its newest intact checkpoint), or true: the intact checkpoint written last among this run name's
    earlier runs (sibling folders of run_dir), so an interrupted run is the one continued, not an older
    run that got further. Damaged checkpoints are named in the log and skipped."""
    if resume in (False, None, "false", "False"):
        return None
    if resume not in (True, "true", "True"):
        path = Path(str(resume)).expanduser()
        if not path.exists():
            raise CheckpointError(f"trainer.resume={resume}: no such file or directory")
        if path.name.startswith(_PREFIX) and ((path / MANIFEST_FILE).exists() or (path / STATE_FILE).exists()):
            problem = None if _is_legacy(path) else verify(path)
            if problem is not None:
                raise CheckpointError(f"trainer.resume={resume}: the checkpoint is damaged: {problem}; pass "
                                      "another checkpoint or trainer.resume=true for the newest intact one")
            return path
        folders = _all_step_folders(checkpoint_dir(path)) or _all_step_folders(path)
        return _first_intact(folders, f"trainer.resume={resume}")
    folders = []
    for sibling in run_dir.parent.iterdir() if run_dir.parent.is_dir() else []:
        folders += _all_step_folders(checkpoint_dir(sibling))
    return _first_intact(folders, f"trainer.resume=true (looked under {run_dir.parent}/*/checkpoints)")


def read_state(path: Path) -> TrainerState:
    try:
        return TrainerState.from_dict(json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is unreadable ({err})") from err


# ---- load ------------------------------------------------------------------------------------
def _legacy_load(path: Path, name: str):
    """An earlier layout's pickle, through torch's weights-only unpickler: tensors, containers,
    numbers and numpy's RNG array only (the allowlist); any other global, code included, is refused."""
    import pickle

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it; pickles name whichever wrote them
    allowed = [np.dtype, np.ndarray, core.multiarray._reconstruct, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path / name, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {path}: {name} was refused: it holds more than tensors and plain values, or is damaged "
            f"({' '.join(str(err).split())[:200]}); loading it could run code it carries. Resume from a "
            "checkpoint this version wrote, or start without trainer.resume") from None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG; returns the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    legacy = _is_legacy(path)
    try:
        adapter = load_file(str(path / ADAPTER_WEIGHTS))
        if legacy:
            optimizer_state, scheduler_state, rng = (_legacy_load(path, name) for name in _LEGACY_FILES)
        else:
            optimizer_state, scheduler_state, rng = (load_state(path, name) for name in ("optimizer", "scheduler", "rng"))
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from err
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"checkpoint {path} does not match the model's adapters (unexpected "
                              f"{result.unexpected_keys[:5]}); resume with the recipe that wrote it")
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: its optimizer or scheduler state does not fit this recipe's "
                              f"({err}); resume with the recipe that wrote it") from err
    set_rng_state(rng)
    return read_state(path)


# ---- what a resume may change ------------------------------------------------------------------
# Recipe keys that decide the trained function: the base and its format, the adapter's shape and the
# objective. A resume that changes one would train the saved adapter on another base (an int8 base
# under an NF4 adapter) or fail deep in PEFT with size mismatches (another lora.r).
MODEL_KEYS = ("model.name_or_path", "model.revision", "quantization.quant_type", "quantization.method",
              "quantization.double_quant", "quantization.blocksize", "quantization.gptq", "quantization.skip_modules",
              "lora.r", "lora.alpha", "lora.target_modules", "lora.use_rslora", "lora.use_dora", "lora.bias",
              "lora.init", "objective")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def check_resume_compatible(checkpoint: Path, cfg) -> list[str]:
    """Compare the recipe the checkpoint's run recorded (its config.yaml) with `cfg`: raise naming the
    keys when one that changes the model differs; return "key: old -> new" for the rest that differ
    (the schedule, the data, the logging), which the caller reports. A checkpoint outside a run folder has no recipe to
    compare, and is taken as it is."""
    from omegaconf import OmegaConf

    recorded_path = checkpoint.parent.parent / "config.yaml"
    if not recorded_path.is_file():
        return []
    recorded = _flatten(OmegaConf.to_container(OmegaConf.load(recorded_path), resolve=True))
    current = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    model = [k for k in changed if any(k == m or k.startswith(m + ".") for m in MODEL_KEYS)]
    if model:
        details = "; ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in model)
        raise CheckpointError(f"trainer.resume: {checkpoint} was trained with another model ({details}); a resume "
                              "continues the same base, format, adapter and objective: set these back, or start a "
                              "new run without trainer.resume")
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in changed if k != "trainer.resume"]
