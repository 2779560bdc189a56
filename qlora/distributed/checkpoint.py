"""Sharded training checkpoints through torch.distributed.checkpoint (DCP), staged and verified.

A checkpoint `checkpoints/step-000120/` holds `dcp/` (DCP's files: every rank writes its own part
in parallel) and `trainer_state.json`, written by rank 0 last. Inside DCP, flat string keys:
- `adapter/<parameter name>`: the trainable parameters; under FSDP2 DTensors, so each rank writes
  its shard; under DDP identical on every rank, written once (DCP de-duplicates);
- `rank<r>/optimizer/...`: rank r's optimizer state, its own shard under FSDP2 (the optimizer
  steps on local shards), as tensors, plus the non-tensor rest pickled;
- `rank<r>/rng`: rank r's RNG states (dropout masks differ per rank); `scheduler`: shared.
The folder is written under a temporary name; rank 0 checks DCP's metadata against what every
rank meant to write and that each data file holds the bytes the metadata points at, writes
trainer_state.json, and renames the folder into place: a crash leaves no complete-looking
checkpoint behind. Resuming needs the same world size (the optimizer shards are per rank).
Checkpoints go to a filesystem every rank sees (the run directory; a shared one across nodes).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qlora.distributed.sharding import unwrap
from qlora.distributed.world import World
from qlora.train.checkpoint import (STATE_FILE, _PREFIX, checkpoint_dir, complete_checkpoints, rng_state, set_rng_state,
                                    write_manifest)
from qlora.train.state import TrainerState
from qlora.train.state_io import load_state, save_state

DCP_DIR = "dcp"


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}


def _flatten(prefix: str, value, tensors: dict, skeleton=None):
    """Nested dicts/lists of tensors -> flat {prefix/path: tensor} plus a skeleton with key strings
    where the tensors were (pickled as one bytes item)."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach()
        return ("__tensor__", prefix)
    if isinstance(value, dict):
        return {k: _flatten(f"{prefix}/{k}", v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_flatten(f"{prefix}/{i}", v, tensors) for i, v in enumerate(value))
    return value


def _unflatten(skeleton, tensors: dict):
    if isinstance(skeleton, tuple) and len(skeleton) == 2 and skeleton[0] == "__tensor__":
        return tensors[skeleton[1]]
    if isinstance(skeleton, dict):
        return {k: _unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_unflatten(v, tensors) for v in skeleton)
    return skeleton


def _state_to_save(model, optimizer, world: World) -> tuple[dict, dict]:
    """(the DCP state: adapter shards and this rank's optimizer tensors, the optimizer's structure)."""
    state = {f"adapter/{name}": p.detach() for name, p in _trainable(model).items()}
    tensors: dict = {}
    skeleton = _flatten(f"rank{world.rank}/optimizer", optimizer.state_dict(), tensors)
    state.update(tensors)
    return state, skeleton


def save_sharded(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: TrainerState,
                 keep_last: int, world: World) -> Path:
    """Every rank calls this at the same step; returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_dir(run_dir)
    final = root / f"{_PREFIX}{step:06d}"
    staging = None
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{final.name}.", dir=root)
    staging = Path(world.broadcast(staging))
    state, skeleton = _state_to_save(model, optimizer, world)
    keys = world.gather_keys(sorted(state))
    try:
        with world.guard(f"writing checkpoint {final.name}"):
            dcp.save(state, checkpoint_id=str(staging / DCP_DIR))
            # The non-tensor state without pickle (safetensors + JSON), as single-process checkpoints.
            save_state({"optimizer_skeleton": skeleton, "rng": rng_state()}, staging, f"rank{world.rank}")
            if world.is_main:
                save_state(scheduler.state_dict(), staging, "scheduler")
        world.barrier(f"finishing checkpoint {final.name}")
        if world.is_main:
            verify(staging / DCP_DIR, keys)
            (staging / STATE_FILE).write_text(json.dumps({**trainer_state.to_dict(), "step": step,
                                                          "world_size": world.size}, indent=2))
            write_manifest(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        world.barrier(f"publishing checkpoint {final.name}")
    except BaseException:
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def verify(path: Path, expected_keys: set[str]) -> None:
    """Raise unless DCP's metadata lists every expected key and its files hold every byte it names."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    missing = sorted(expected_keys - set(metadata.state_dict_metadata))
    if missing:
        raise RuntimeError(f"checkpoint {path.parent.name} is incomplete: DCP metadata lacks {missing[:5]}")
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else -1
        if actual < size:
            raise RuntimeError(f"checkpoint {path.parent.name}: {name} holds {actual} bytes, the metadata needs {size}")


def load_sharded(path: Path, model, optimizer, scheduler, world: World) -> TrainerState:
    """Restore adapter shards, this rank's optimizer and RNG state, the scheduler; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    trainer_state = json.loads((path / STATE_FILE).read_text())
    saved_size = trainer_state.get("world_size")
    if saved_size != world.size:
        raise ValueError(f"checkpoint {path} was written by {saved_size} processes, this run has {world.size}: "
                         f"resume with the same number (torchrun --nproc_per_node={saved_size} ...)")
    metadata = FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    trainable = _trainable(model)
    missing = [name for name in trainable if f"adapter/{name}" not in metadata]
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model's adapters: no {missing[:3]}")
    prefix = f"rank{world.rank}/optimizer/"
    state: dict = {f"adapter/{name}": p.detach() for name, p in trainable.items()}
    for key, info in metadata.items():
        if key.startswith(prefix):
            state[key] = torch.empty(tuple(info.size), dtype=info.properties.dtype)
    with torch.no_grad(), world.guard(f"reading checkpoint {path.name}"):
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    own = load_state(path, f"rank{world.rank}")
    optimizer.load_state_dict(_unflatten(own["optimizer_skeleton"], state))
    scheduler.load_state_dict(load_state(path, "scheduler"))
    set_rng_state(own["rng"])
    return TrainerState.from_dict(trainer_state)


def save_adapter(model, directory: Path, world: World) -> None:
    """The final adapter as a plain PEFT adapter: shards gathered on every rank, written once by rank 0."""
    from qlora.distributed.sharding import full_trainable_state
    from qlora.staging import staged_directory

    state = full_trainable_state(model, world)
    if world.is_main:
        with staged_directory(directory) as staging:
            unwrap(model).save_pretrained(staging, state_dict=state)
    world.barrier("writing the adapter")
