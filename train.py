#!/usr/bin/env python
"""Fine-tune a causal LM with QLoRA: the base frozen in NF4, LoRA adapters trained through PEFT.

    python train.py                                   # the embedded default: a few minutes on a CPU
    python train.py recipe=llama7b_nf4                # the QLoRA paper setup for a 7B Llama
    python train.py recipe=llama7b_nf4 lora.r=16 trainer.max_steps=500 logger=wandb
    python train.py recipe=llama7b_nf4 trainer.resume=true
    python train.py recipe=llama7b_nf4 --cfg job      # print the composed config and exit
    torchrun --nproc_per_node=2 train.py recipe=llama7b_nf4 distributed=fsdp2   # more than one GPU

Recipes live in recipes/; every field is documented in qlora/train/schema.py. An error caused by
input prints one line, `error: ...`; QLORA_DEBUG=1 (or HYDRA_FULL_ERROR=1) adds the traceback.
"""
import os
import sys

# The repository root must not be on sys.path: its kernels/ folder (installed as qlora.kernels)
# would shadow Hugging Face's `kernels` package, which transformers probes by importing it.
_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qlora.train.schema import register  # noqa: E402

register()

# Ranks other than 0 (torchrun, accelerate launch) write nothing of their own: rank 0's run folder is
# the run's (qlora.train.runner broadcasts it), so theirs would be a stray outputs/<name>/<time>/
# holding a copy of .hydra/ and a train.log of warnings. Hydra creates its run folder before main()
# runs; pointed at the working directory (which exists), it creates nothing, saves no .hydra/ and
# logs to stdout only.
_RANK_OVERRIDES = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")
if os.environ.get("RANK", "0") != "0":
    _keys = tuple(o.split("=", 1)[0] + "=" for o in _RANK_OVERRIDES)
    sys.argv[1:] = [a for a in sys.argv[1:] if not a.lstrip("+~").startswith(_keys)] + list(_RANK_OVERRIDES)


def _remove_run_dir_if_nothing_ran() -> None:
    """A run refused before it started (a bad value, nothing left to resume) leaves no run folder: Hydra
    made it before main() ran, holding only its own .hydra/ and train.log."""
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from qlora.errors import UserError, report
    from qlora.train import run
    from qlora.train.runner import RunInterrupted

    try:
        run(cfg)
    except UserError as err:
        # Input the user can fix from the message alone: one line, no traceback (QLORA_DEBUG=1 shows it).
        report(err)
        if os.environ.get("RANK", "0") == "0":  # the others' Hydra folder is the working directory
            _remove_run_dir_if_nothing_ran()
        sys.exit(130 if isinstance(err, RunInterrupted) else 1)
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
