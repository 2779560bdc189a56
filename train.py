#!/usr/bin/env python
"""Fine-tune a causal LM with QLoRA: the base frozen in NF4, LoRA adapters trained through PEFT.

    python train.py                                   # the embedded default: under a minute on a CPU
    python train.py recipe=llama7b_nf4                # the QLoRA paper setup for a 7B Llama
    python train.py recipe=llama7b_nf4 lora.r=16 trainer.max_steps=500 logger=wandb
    python train.py recipe=llama7b_nf4 trainer.resume=true
    python train.py recipe=llama7b_nf4 --cfg job      # print the composed config and exit
    torchrun --nproc_per_node=2 train.py recipe=llama7b_nf4 distributed=fsdp2   # more than one GPU

The same entry point as `qlora train <overrides>` (qlora.train.command), which works from an
installed package in any folder. Recipes live in recipes/ (installed as qlora.recipes); every field
is documented in qlora/train/schema.py. An error caused by input prints one line, `error: ...`;
QLORA_DEBUG=1 (or HYDRA_FULL_ERROR=1) adds the traceback.
"""
import sys

from qlora.fast_exit import exit_process
from qlora.train.command import main

if __name__ == "__main__":
    main(program=sys.argv[0])  # as invoked, so that messages can give the exact command again
    exit_process(0)  # everything is written: skip the interpreter's second-long teardown
