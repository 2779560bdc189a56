"""The generated dispatch tables as data: `<format>/dispatch_table.json`, written by the machine-code
model's benchmark (benchmarks/kernels_static.py, benchmarks/gptq_kernels_static.py) and read here
into the nested dicts the formats' `ops.path_table` looks up.

JSON keys are strings, so the tables spell their keys as the readers need them back: an arch or a
bit width as digits ("90" -> 90), a weight shape as "out x in [x blocksize]" ("4096x14336x64" ->
(4096, 14336, 64)); a leaf's buckets [[largest M, path], ...] come back as tuples. Other keys
("gate_proj M=16") stay strings.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

_SHAPE = re.compile(r"\d+(x\d+)+")


def _key_in(key: str):
    if key.isdigit():
        return int(key)
    if _SHAPE.fullmatch(key):
        return tuple(int(part) for part in key.split("x"))
    return key


def _key_out(key) -> str:
    return "x".join(str(part) for part in key) if isinstance(key, tuple) else str(key)


def _decode(value):
    if isinstance(value, dict):
        return {_key_in(key): _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_decode(item) for item in value)
    return value


def _encode(value):
    if isinstance(value, dict):
        return {_key_out(key): _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    return value


@functools.cache
def read_table(path: str) -> dict[str, Any]:
    """The table at `path` ({"paths": ..., "predictions": ...}), keys and leaves as described above."""
    return _decode(json.loads(Path(path).read_text()))


def table_text(table: dict[str, Any]) -> str:
    """A table as its file's text: one line per leaf (a row of buckets or of estimates), so a
    regenerated table diffs row by row."""
    def lines(value, depth):
        pad = "  " * depth
        items = list(value.items())
        out = []
        for i, (key, item) in enumerate(items):
            comma = "," if i < len(items) - 1 else ""
            if isinstance(item, dict) and any(isinstance(v, (dict, list)) for v in item.values()):
                out += [f"{pad}{json.dumps(key)}: {{", *lines(item, depth + 1), f"{pad}}}{comma}"]
            else:
                out.append(f"{pad}{json.dumps(key)}: {json.dumps(item)}{comma}")
        return out
    return "\n".join(["{", *lines(_encode(table), 1), "}"]) + "\n"


def write_table(table: dict[str, Any], path: Path) -> None:
    Path(path).write_text(table_text(table))
    read_table.cache_clear()
