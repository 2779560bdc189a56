"""`qlora train <overrides>` and `python train.py <overrides>`: compose the recipe with Hydra, run it.

The recipes are the package's own (`qlora.recipes`, the repository's recipes/ folder), so an installed
wheel trains from any folder. A user's recipe folder composes with them through Hydra's search path:
`qlora train hydra.searchpath=[file:///abs/my_recipes] recipe=mine` takes my_recipes/recipe/mine.yaml.
An error caused by input prints one line, `error: ...`; QLORA_DEBUG=1 (or HYDRA_FULL_ERROR=1) adds the
traceback.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig

from qlora.errors import UserError, report
from qlora.kernels.backend import BackendError
from qlora.train.invocation import record
from qlora.train.schema import register

# Ranks other than 0 (torchrun, accelerate launch) write nothing of their own: rank 0's run folder is
# the run's (qlora.train.runner broadcasts it), so theirs would be a stray outputs/<name>/<time>/
# holding a copy of .hydra/ and a train.log of warnings. Hydra creates its run folder before the task
# runs; pointed at the working directory (which exists), it creates nothing, saves no .hydra/ and
# logs to stdout only.
_RANK_OVERRIDES = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")


# What a run folder holds before its first step: Hydra's .hydra/ and train.log, the run's config.yaml.
_BEFORE_TRAINING = {".hydra", "train.log", "config.yaml"}


def _remove_run_dir_if_nothing_ran() -> None:
    """A run that ended before training started (a bad value, a missing data file, nothing left to
    resume, Ctrl-C while loading) leaves no run folder: it would hold only what the start wrote, and
    count as a run in every later "this folder holds N training runs"."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if run_dir.is_dir() and run_dir.resolve() != Path.cwd().resolve() and \
            {p.name for p in run_dir.iterdir()} <= _BEFORE_TRAINING:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="pkg://qlora.recipes", config_name="config")
def _task(cfg: DictConfig) -> None:
    from qlora.train import run
    from qlora.train.runner import RunInterrupted

    try:
        run(cfg)
    except (UserError, BackendError) as err:
        # Input the user can fix from the message alone: one line, no traceback (QLORA_DEBUG=1 shows it).
        report(err)
        if os.environ.get("RANK", "0") == "0":  # the others' Hydra folder is the working directory
            _remove_run_dir_if_nothing_ran()
        sys.exit(130 if isinstance(err, RunInterrupted) else 1)
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        if os.environ.get("RANK", "0") == "0":
            _remove_run_dir_if_nothing_ran()
        sys.exit(130)


def main(argv: Optional[list[str]] = None, program: str = "qlora train") -> None:
    """Train with the recipe that `argv` (Hydra overrides, `--cfg job`, `--help`, ...) composes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("RANK", "0") != "0":
        keys = tuple(o.split("=", 1)[0] + "=" for o in _RANK_OVERRIDES)
        args = [a for a in args if not a.lstrip("+~").startswith(keys)] + list(_RANK_OVERRIDES)
    register()
    record(program, args)  # for the message that says how to continue an interrupted run
    # Hydra reads its overrides from sys.argv, and names the program from argv[0] in --help.
    sys.argv = [program, *args]
    _task()
