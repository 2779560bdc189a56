#!/usr/bin/env python
"""Fine-tune a causal LM with QLoRA: the base frozen in NF4, LoRA adapters trained through PEFT.

    python train.py                                   # the embedded default: a few minutes on a CPU
    python train.py recipe=llama7b_nf4                # the QLoRA paper setup for a 7B Llama
    python train.py recipe=llama7b_nf4 lora.r=16 trainer.max_steps=500 logger=wandb
    python train.py recipe=llama7b_nf4 trainer.resume=true
    python train.py recipe=llama7b_nf4 --cfg job      # print the composed config and exit
    torchrun --nproc_per_node=2 train.py recipe=llama7b_nf4 distributed=fsdp2   # more than one GPU

Recipes live in recipes/; every field is documented in qlora/train/schema.py.
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


@hydra.main(version_base="1.3", config_path="recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from qlora.data import DataError
    from qlora.distributed import PeerLostError
    from qlora.train.run import run
    from qlora.train.schema import ConfigError
    from qlora.train.trainer import NonFiniteLossError

    try:
        run(cfg)
    except (ConfigError, DataError, NonFiniteLossError, FileNotFoundError, NotImplementedError, PeerLostError) as err:
        # Errors a user can fix from the message alone: no traceback to dig through.
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
