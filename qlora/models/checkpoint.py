"""Finding and reading a checkpoint's safetensors shards, tensor by tensor."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """A local directory holding the checkpoint: the path itself, or a Hub snapshot of the repo id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {text!r} does not exist (or is not a directory)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as err:  # the hub client raises many types; all mean the same to the user
        raise OSError(
            f"could not fetch {text!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Check the repo id and your network, or pass a local directory"
        ) from err


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order."""
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    elif (directory / WEIGHTS_NAME).is_file():
        files = [directory / WEIGHTS_NAME]
    else:
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory} (found: {', '.join(found) or 'nothing'}); "
            "qlora reads safetensors checkpoints only: re-save .bin weights with save_pretrained(safe_serialization=True)"
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"the checkpoint index lists shards that are missing: {', '.join(missing)}")
    return files


class ShardReader(contextlib.AbstractContextManager):
    """Random access to every tensor of a sharded checkpoint; each read copies just that tensor."""

    def __init__(self, directory: Path):
        self._stack = contextlib.ExitStack()
        self._file_of: dict[str, object] = {}
        for path in shard_files(directory):
            handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            for key in handle.keys():
                self._file_of[key] = handle

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> torch.Tensor:
        return self._file_of[key].get_tensor(key)

    def with_prefix(self, prefix: str) -> Iterator[str]:
        return (k for k in self._file_of if k.startswith(prefix))
