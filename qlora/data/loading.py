"""Loading raw records: local files through `datasets`' json/csv/parquet builders, anything else as a
Hub dataset name, plus the held-out split."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import datasets

from qlora.data.errors import DataError, MissingSourceError

# File suffix -> the `datasets` builder that reads it (.jsonl is JSON Lines, which "json" handles).
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Added by load_records so that errors name the row of the source file even after the seeded split
# has shuffled the records; tokenize_records uses it when present and drops it.
SOURCE_INDEX_COLUMN = "source_index"


def _looks_local(source: str) -> bool:
    """A path-like name is never sent to the Hub, so a typo in it gives FileNotFoundError."""
    path = Path(source).expanduser()
    return (path.exists() or path.suffix.lower() in LOCAL_BUILDERS
            or source.startswith(("/", "./", "../", "~", ".\\")) or path.is_absolute())


def _local_data_files(path: Path) -> tuple[str, list[str]]:
    """The builder name and the sorted data files of a file or of a directory of same-type files."""
    if not path.exists():
        raise MissingSourceError(f"data source {str(path)!r} does not exist; check the path (relative paths "
                                f"are resolved from {Path.cwd()})")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix.lower() in LOCAL_BUILDERS]
    if not files:
        raise DataError(f"data source {str(path)!r} has no file ending in one of "
                        f"{', '.join(LOCAL_BUILDERS)}; convert the data to one of these formats")
    builders = {LOCAL_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise DataError(f"data directory {str(path)!r} mixes file types ({', '.join(sorted(builders))}); "
                        f"keep one format per directory")
    return builders.pop(), [str(p) for p in files]


def check_sources(*sources) -> None:
    """Refuse a local data source that is missing or holds no readable file, reading no record: what
    a run checks before it loads the model (a typo in a path then costs seconds, not a model load)."""
    for source in sources:
        if source is not None and (isinstance(source, Path) or _looks_local(str(source))):
            _local_data_files(Path(str(source)).expanduser())


def _load_one(source: str | Path, split: str) -> datasets.Dataset:
    source_text = str(source)
    if isinstance(source, Path) or _looks_local(source_text):
        builder, files = _local_data_files(Path(source_text).expanduser())
        for file in files:
            if os.path.getsize(file) == 0:
                raise DataError(f"data file {file!r} is empty; fill it with records or point data.source elsewhere")
        logger, level = logging.getLogger("datasets"), logging.getLogger("datasets").level
        logger.setLevel(logging.CRITICAL)  # a parse failure is reported once, below, not also as a log line
        try:
            # One list of data files makes one split named "train"; `split` may still slice it ("train[:100]").
            return datasets.load_dataset(builder, data_files=files, split=split)
        except Exception as error:  # pyarrow, pandas, datasets: whatever reading raised, say which file and line
            raise DataError(_diagnose(builder, files, error)) from error
        finally:
            logger.setLevel(level)
    try:
        return datasets.load_dataset(source_text, split=split)
    except Exception as error:  # network, auth, unknown name or split: all end here
        raise DataError(
            f"could not load dataset {source_text!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(error).__name__}: {error}. It is not a local file or directory either. The Hub may be "
            f"unreachable (offline, HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, or no network) or the name "
            f"or split may be wrong; pass a local .json/.jsonl/.csv/.parquet file or directory instead"
        ) from error


def _diagnose(builder: str, files: list[str], error: Exception) -> str:
    """Which file (and for JSON, which line) could not be read, and what to do about it."""
    if builder == "json":
        for file in files:
            problem = _first_bad_json(file)
            if problem:
                return f"{problem}; fix or remove it (each line of a .jsonl file is one JSON object)"
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return (f"could not read {builder} data from {', '.join(map(repr, files))} ({reason}); check that each file is "
            f"valid {builder.upper()} with one record per row")


def _first_bad_json(file: str) -> str | None:
    """`file line N: ...` for the first line that is not a JSON object (JSON Lines, read line by line),
    else None. A file holding one JSON array of records is checked whole."""
    with open(file, encoding="utf-8", errors="replace") as handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if head.startswith("["):
            try:
                json.load(handle)
                return None  # one valid document: the problem is elsewhere
            except json.JSONDecodeError as err:
                return f"data file {file!r} line {err.lineno}, column {err.colno}: invalid JSON ({err.msg})"
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                return (f"data file {file!r} line {number}: invalid JSON ({err.msg} at column {err.colno}): "
                        f"{line.strip()[:80]!r}")
            if not isinstance(record, dict):
                return (f"data file {file!r} line {number}: a {type(record).__name__}, not a JSON object: "
                        f"{line.strip()[:80]!r}")
    return None


def _with_source_index(dataset: datasets.Dataset) -> datasets.Dataset:
    if SOURCE_INDEX_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(SOURCE_INDEX_COLUMN, list(range(len(dataset))))


def load_records(source: str | Path, split: str = "train", eval_source: str | Path | None = None,
                 eval_fraction: float = 0.05, seed: int = 0,
                 eval_split: str = "train") -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Load `(train, eval)` record datasets.

    `source` is a local .json/.jsonl/.csv/.parquet file or a directory of such files (one type), else
    a Hub dataset name loaded with `datasets.load_dataset(source, split=split)`. The eval set is
    `eval_source` (with `eval_split`, e.g. "test" for a Hub dataset) when given, else a seeded
    `train_test_split` holding out `eval_fraction` of the records (at least one); 0 means no eval set.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train = _with_source_index(_load_one(source, split))
    if len(train) == 0:
        raise DataError(f"data source {str(source)!r} (split {split!r}) has no records")
    if eval_source is not None:
        return train, _with_source_index(_load_one(eval_source, eval_split))
    if eval_fraction == 0:
        return train, None
    eval_size = math.ceil(len(train) * eval_fraction)  # the rounding train_test_split uses for a fraction
    if eval_size >= len(train):
        raise DataError(f"data source {str(source)!r} has {len(train)} record(s), too few to hold out "
                        f"{eval_fraction:.0%} for evaluation and keep any for training; lower "
                        f"eval_fraction, set it to 0 or pass eval_source")
    parts = train.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
