"""The one way an error a user can fix reaches them: a `UserError`, printed as one line.

Code that reads input (a recipe value, a data file, a model path, a checkpoint, the network)
catches what the library underneath raises and re-raises a `UserError` subclass whose message
names the file, key or value and the fix. `train.py` and every `qlora` command catch `UserError`
alone and print `error: <message>`; anything else is a bug and keeps its traceback. The subclasses
also derive from the builtin type a caller would have caught before (ValueError, FileNotFoundError,
...), so `except ValueError` in user code keeps working.

Set QLORA_DEBUG=1 (or HYDRA_FULL_ERROR=1, Hydra's own switch) to get the traceback as well.
"""
from __future__ import annotations

import os
import sys
import traceback


class UserError(Exception):
    """An error caused by input the user controls; the message alone tells them what to change."""


class InputPathError(UserError, FileNotFoundError):
    """A path the user gave does not exist, or is not what it must be."""


class OutputExistsError(UserError, FileExistsError):
    """An output path is taken and overwriting was not asked for."""


class OptionError(UserError, ValueError):
    """An option value out of its range or choices (API and CLI options; recipes use ConfigError)."""


class DamagedFileError(UserError, ValueError):
    """A file exists but is truncated, corrupt or not what it claims to be."""


class UnsupportedError(UserError, NotImplementedError):
    """A valid input that qlora does not handle (a checkpoint layout, an option combination)."""


class NetworkError(UserError, OSError):
    """The Hugging Face Hub could not be reached (offline, no network) for a name that needs it."""


def debug_requested() -> bool:
    """QLORA_DEBUG=1 or HYDRA_FULL_ERROR=1: show tracebacks too."""
    return any(os.environ.get(name, "") not in ("", "0", "false") for name in ("QLORA_DEBUG", "HYDRA_FULL_ERROR"))


def one_line(message: object) -> str:
    """The message on one line: wrapped library messages sometimes carry newlines."""
    return " ".join(str(message).split())


def _end_progress_bars() -> None:
    """Close the progress bars the failed work left open, so the message starts its own line rather
    than being appended to a half-drawn bar (tqdm ends a closed bar's line)."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def report(error: BaseException, file=None) -> None:
    """Print `error: <one line>` (and the traceback when debugging) to stderr."""
    file = file or sys.stderr
    _end_progress_bars()
    if debug_requested():
        traceback.print_exception(error, file=file)
    print(f"error: {one_line(error)}", file=file, flush=True)
