"""The command line of every `qlora <command>`: key=value arguments checked against the command's
options table ({key: (default, help)}), and the typed readers of their values. Each error is a
UsageError, one line naming the key and what it must be (exit status 2).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from qlora.errors import UserError


class UsageError(UserError):
    """A wrong command line: unknown key, missing or malformed value (exit status 2)."""


def help_text(name: str, options: dict) -> str:
    width = max(len(k) for k in options) + 2
    def shown(key, default, text):
        return f"{key}=..." if text.startswith("required") else f"[{key}={'...' if default is None else default}]"

    lines = [f"usage: qlora {name} " + " ".join(shown(k, d, t) for k, (d, t) in options.items()),
             "", "options:"]
    for key, (default, text) in options.items():
        lines.append(f"  {key:<{width}}{text}" + ("" if default is None else f" (default: {default})"))
    return "\n".join(lines)


def parse_options(name: str, args: list[str], options: dict, renamed: Optional[dict] = None) -> dict:
    """{key: value} of `qlora <name> key=value ...`: every key known, every required one given. `renamed`
    maps former key names to current ones: still accepted, with a deprecation warning."""
    renamed = renamed or {}
    values = {k: d for k, (d, _) in options.items()}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UsageError(f"qlora {name}: argument {arg!r} is not key=value; see `qlora {name} --help`")
        key = key.lstrip("-")
        if key in renamed:
            new = renamed[key]
            print(f"warning: qlora {name}: {key}= is deprecated; use {new}=", file=sys.stderr)
            key = new
        if key not in options:
            raise UsageError(f"qlora {name}: unknown key {key!r}; known keys: {', '.join(options)} "
                             f"(see `qlora {name} --help`)")
        values[key] = value
    missing = [k for k, v in values.items() if v is None and options[k][1].startswith("required")]
    if missing:
        raise UsageError(f"qlora {name}: missing {', '.join(f'{k}=...' for k in missing)}; see `qlora {name} --help`")
    return values


def as_bool(key: str, value: str) -> bool:
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UsageError(f"{key}={value!r} must be true or false")


def as_number(key: str, value: str, kind: Callable, minimum=None, maximum=None, low_open=False):
    """`value` as `kind`, in [minimum, maximum] (or (minimum, maximum] with low_open)."""
    try:
        number = kind(value)
    except ValueError:
        raise UsageError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UsageError(f"{key}={value!r} must be a finite number")
    low_bad = minimum is not None and (number <= minimum if low_open else number < minimum)
    if low_bad or (maximum is not None and number > maximum):
        low = "" if minimum is None else f"{'>' if low_open else '>='} {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise UsageError(f"{key}={value} must be {' and '.join(x for x in (low, high) if x)}")
    return number


def as_choice(key: str, value: str, choices) -> str:
    if value not in choices:
        raise UsageError(f"{key}={value!r} is not one of {', '.join(choices)}")
    return value


def device_problem(device: str) -> Optional[str]:
    """Why `device` ("cpu", "cuda", "cuda:N", lower-case) cannot be used on this machine: "not a device",
    "no cuda" or "no such index"; None when it can. One rule for every device option (the commands'
    device=, the recipe's trainer.device), each of which words its own message."""
    import torch

    if device == "cpu":
        return None
    index = device.removeprefix("cuda").removeprefix(":")
    if not device.startswith("cuda") or (index and not index.isdigit()) or device == "cuda:":
        return "not a device"
    if not torch.cuda.is_available():
        return "no cuda"
    if index and int(index) >= torch.cuda.device_count():
        return "no such index"
    return None


def as_device(key: str, value: str) -> str:
    """A `device=` value as torch takes it: cpu, cuda, cuda:N, or auto (cuda when available). A CUDA
    device this machine does not have is refused here, before any model is read."""
    import torch

    text = str(value).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    problem = device_problem(text)
    if problem == "not a device":
        raise UsageError(f"{key}={value!r} is not a device; use cpu, cuda, cuda:<index> or auto")
    if problem == "no cuda":
        raise UsageError(f"{key}={value} but this machine has no CUDA device torch can use; use {key}=cpu "
                         f"(or {key}=auto)")
    if problem == "no such index":
        raise UsageError(f"{key}={value} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use an index below that")
    return text


def as_existing_path(key: str, value: str) -> str:
    """`value` unchanged when it exists or does not look like a local path (a Hub id, "embedded");
    a local-looking path that does not exist is refused here, naming the key, before anything loads."""
    from pathlib import Path

    text = str(value)
    looks_local = text.startswith(("/", "./", "../", "~")) or Path(text).suffix != "" or text.count("/") > 1
    if looks_local and not Path(text).expanduser().exists():
        raise UsageError(f"{key}={value}: no such file or directory")
    return text


def as_output_file(key: str, value: str) -> str:
    """A file to write: its folder must exist (or be creatable: its parents hold no file in the way)."""
    from pathlib import Path

    path = Path(value).expanduser()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{key}={value}: {parent} is a file, not a folder; choose another path")
            break
    if path.is_dir():
        raise UsageError(f"{key}={value} is a directory; give a file path, e.g. {path / 'report.json'}")
    return str(path)
