"""Writing a directory all at once: build it under a temporary sibling name, rename it into place.

A crash or an error mid-write then leaves no half-written output where a complete one is expected,
and an existing output is replaced only once the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_directory(output_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `output_dir`; on success it becomes `output_dir`, on
    any exception it is removed and `output_dir` is left as it was."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        yield staging
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, output_dir: Path) -> None:
    if output_dir.exists():
        # Swap: the old contents are removed only once the new ones are in place.
        retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
        os.replace(output_dir, retired / "contents")
        os.replace(staging, output_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output_dir)
