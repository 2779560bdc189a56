"""Finding and reading a checkpoint's safetensors shards, tensor by tensor."""
from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Iterator, Optional

import torch

from qlora.errors import DamagedFileError, InputPathError, NetworkError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: Optional[str] = None,
                       option: str = "name_or_path") -> Path:
    """A local directory holding the checkpoint: the path itself, or a Hub snapshot of the repo id.

    A name that looks like a path (./, /, ~, more than one /) must exist locally: it is never sent
    to the Hub. A Hub id is fetched only when the Hub is reachable; offline (HF_HUB_OFFLINE=1 or no
    connection within a few seconds) it comes from the local cache or fails at once, saying how to
    point at a local directory, instead of a minute of retries. `option` names the value in errors.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise InputPathError(f"{option}={text} is a file, not a checkpoint directory; pass the folder that holds "
                             "config.json and the safetensors files")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise InputPathError(f"{option}={text}: checkpoint directory does not exist (relative paths are resolved "
                             f"from {Path.cwd()}); check the path")
    from huggingface_hub import constants, snapshot_download

    fetch = dict(revision=revision, allow_patterns=_DOWNLOAD_PATTERNS)
    offline_hint = (f"{text!r} is not a local directory, and as a Hugging Face Hub id it needs the network. Download "
                    f"it where there is one (huggingface-cli download {text} --local-dir <dir>) and pass "
                    f"{option}=<dir>, or pass any local checkpoint directory")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment may have changed since.
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or not _hub_reachable(constants.ENDPOINT):
        why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached (offline?)"
        try:
            return Path(snapshot_download(text, local_files_only=True, **fetch))
        except Exception:  # not in the local cache (the hub client's types vary): the hint below says what to do
            raise NetworkError(f"{why} and {offline_hint}; it is not in the local cache either") from None
    try:
        return Path(snapshot_download(text, **fetch))
    except Exception as err:  # the hub client raises many types; all mean the same to the user
        raise NetworkError(
            f"could not fetch {text!r} from the Hugging Face Hub ({type(err).__name__}: {' '.join(str(err).split())[:300]}). "
            f"Check the repo id ({option}=...), your network and login, or pass a local directory"
        ) from err


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub's host: the hub client would otherwise retry for about a minute."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


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
        raise InputPathError(
            f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory} (found: {', '.join(found) or 'nothing'}); "
            "qlora reads safetensors checkpoints only: re-save .bin weights with save_pretrained(safe_serialization=True)"
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputPathError(f"the checkpoint index lists shards that are missing: {', '.join(missing)}")
    return files


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _Shard:
    """One safetensors file read with plain reads, not mmap.

    A memory map would keep every page it touched resident, so loading a 2 GB checkpoint would
    peak at 2 GB of RSS however early each dense tensor is dropped. Reading each tensor into its
    own buffer (and telling the kernel the pages are no longer needed) keeps the peak at the
    quantized model plus one tensor.
    """

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        try:
            (header_size,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(header_size))
        except (struct.error, ValueError) as err:
            self.file.close()
            raise DamagedFileError(f"{path} is not a valid safetensors file ({err}); re-download or re-save it") from err
        header.pop("__metadata__", None)
        self.data_start = 8 + header_size
        self.entries = header

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, which qlora cannot read")
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.data_start + begin)
        if self.file.readinto(buffer.numpy()) != end - begin:
            raise DamagedFileError(f"{self.path}: tensor {key!r} is truncated; the file is incomplete: re-download "
                                   "or re-save it")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.file.fileno(), self.data_start + begin, end - begin, os.POSIX_FADV_DONTNEED)
        return buffer.view(dtype).reshape(entry["shape"])

    def close(self):
        self.file.close()


class ShardReader(contextlib.AbstractContextManager):
    """Random access to every tensor of a sharded checkpoint; each read copies just that tensor."""

    def __init__(self, directory: Path):
        self._shards: list[_Shard] = []
        self._shard_of: dict[str, _Shard] = {}
        try:
            for path in shard_files(directory):
                shard = _Shard(path)
                self._shards.append(shard)
                self._shard_of.update(dict.fromkeys(shard.entries, shard))
        except BaseException:
            self.close()
            raise

    def close(self):
        for shard in self._shards:
            shard.close()

    def __exit__(self, *exc):
        self.close()
        return False

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def get(self, key: str) -> torch.Tensor:
        return self._shard_of[key].read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape from the file's header, without reading it."""
        return tuple(self._shard_of[key].entries[key]["shape"])

    def file_of(self, key: str) -> Path:
        """The shard file that holds `key` (for error messages)."""
        return self._shard_of[key].path

    def has(self, key: str) -> bool:
        return key in self._shard_of

    def with_prefix(self, prefix: str) -> Iterator[str]:
        return (k for k in self._shard_of if k.startswith(prefix))
