"""The command line that started this process's run, so that a message can give the exact command
that continues it (`python train.py ...` or `qlora train ...`, with trainer.resume=<checkpoint>)."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

_ARGV: list[str] = []


def record(program: str, overrides: list[str]) -> None:
    """Set by the command-line entry point; a run started from Python records nothing."""
    _ARGV[:] = [program, *overrides]


def continue_command(checkpoint: Path) -> str:
    """The command that continues from `checkpoint`: this process's own, trainer.resume replaced."""
    resume = f"trainer.resume={checkpoint}"
    if not _ARGV:
        return f"the same recipe with {resume}"
    program, overrides = _ARGV[0], [a for a in _ARGV[1:] if not a.lstrip("+~").startswith("trainer.resume=")]
    prefix = ["python", program] if program.endswith(".py") else program.split()
    return shlex.join([*prefix, *overrides, resume])


def interrupted_message(step: int, checkpoint: Optional[Path]) -> str:
    if checkpoint is None:
        return (f"interrupted at step {step}, before any checkpoint was written: there is nothing to continue "
                "from; run the command again to start over (trainer.save_every sets how often checkpoints are written)")
    return f"interrupted at step {step}; newest checkpoint: {checkpoint}. To continue this run: {continue_command(checkpoint)}"
