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


def check_overrides(args: list[str]) -> None:
    """Compose the recipe `args` ask for with Hydra's compose API, and turn what Hydra refuses (a value of
    the wrong type, an unknown key, an unknown group option, an override it cannot parse) into one
    ConfigError line naming the override; Hydra itself would print a multi-line report. Command-line
    flags (--cfg, --help, -m) and hydra.* settings other than the search path are left to Hydra."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qlora.errors import one_line
    from qlora.train.schema import ConfigError

    if any(a.startswith("-") for a in args):
        return
    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra.") or a.startswith("hydra.searchpath")]
    try:
        with initialize_config_module("qlora.recipes", version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
        # OmegaConf's messages end with lines about its own types (full_key, reference_type, object_type);
        # the rest says what is wrong (Hydra adds the available options of a group), and the override it
        # came from names the key.
        lines = [line.strip() for line in str(cause or err).strip().splitlines()
                 if not line.strip().startswith(("full_key:", "reference_type", "object_type"))]
        if "Config search path:" in lines:  # Hydra's own search path, after the available options
            lines = lines[:lines.index("Config search path:")]
        detail = " ".join(line for line in lines if line)
        where = str(err).strip().splitlines()[0].rstrip(".") if cause is not None else ""
        raise ConfigError(one_line(f"{where}: {detail}" if where and where != detail else detail)) from err


def main(argv: Optional[list[str]] = None, program: str = "qlora train") -> None:
    """Train with the recipe that `argv` (Hydra overrides, `--cfg job`, `--help`, ...) composes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("RANK", "0") != "0":
        keys = tuple(o.split("=", 1)[0] + "=" for o in _RANK_OVERRIDES)
        args = [a for a in args if not a.lstrip("+~").startswith(keys)] + list(_RANK_OVERRIDES)
    register()
    try:
        check_overrides(args)
    except UserError as err:
        report(err)
        sys.exit(1)
    record(program, args)  # for the message that says how to continue an interrupted run
    # Hydra reads its overrides from sys.argv, and names the program from argv[0] in --help.
    sys.argv = [program, *args]
    _task()
