"""ShardWriter: safetensors shards written as they fill, so only one shard is ever held in memory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora.models.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME


class ShardWriter:
    """Add tensors one by one; a shard is written once the next tensor would push it past `limit`.

    Shards get provisional names while the total count is unknown and are renamed by `close()`
    into transformers' `model-0000i-of-0000n.safetensors` (or `model.safetensors` for one shard).
    """

    def __init__(self, directory: Path, limit: int):
        self.directory, self.limit = Path(directory), limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.peak_pending_bytes = 0  # what the writer held at most (reported, and checked by the tests)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.limit:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.peak_pending_bytes = max(self.peak_pending_bytes, self.pending_bytes)

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.written:
            self._flush()
        count = len(self.written)
        if count == 1:
            final = self.directory / WEIGHTS_NAME
            os.replace(self.written[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self.written, 1):
            final = self.directory / f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return finals
