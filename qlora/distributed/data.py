"""Which examples each rank trains on: the single-process stream of micro-batches, dealt out.

A step on N ranks must see the examples a single process sees in a step with the same global batch
(micro_batch_size x gradient_accumulation_steps x N). The single-process run draws micro-batches in
a seeded per-epoch order (trainer.EpochSampler); here every rank computes that same global stream
and keeps its own part of each step: with A accumulation steps per rank, rank r takes the step's
micro-batches r*A .. r*A + A - 1. The micro-batches themselves are identical to the single
process's (same examples, same padding), so each one's loss sum is bit-identical; only the order in
which sums and gradients are added differs. The epoch/batch position advances by the whole global
step on every rank, so checkpoints record the same data position as a single-process run would.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from qlora.data.order import epoch_order
from qlora.distributed.world import World


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def rank_micro_batches(dataset, collate: Callable, state: dict, micro_batch_size: int, accumulation: int,
                       seed: int, world: World, device: torch.device,
                       lengths: Optional[list[int]] = None) -> Iterator[dict]:
    """Endless micro-batches of this rank, `accumulation` per step; state.epoch / state.batch count
    global micro-batches (as in a single-process run) and are advanced a whole step at a time.
    lengths: grouped by length, as the single process groups them (qlora.data.order)."""
    size, cached = len(dataset), (None, None)
    while True:
        step_indices = []
        for _ in range(accumulation * world.size):
            epoch, batch = state.epoch, state.batch
            if cached[0] != epoch:
                cached = (epoch, epoch_order(size, seed, epoch, lengths, micro_batch_size))
            order = cached[1]
            start = batch * micro_batch_size
            step_indices.append(order[start:start + micro_batch_size])
            state.batch += 1
            if start + micro_batch_size >= size:  # the epoch's last (possibly short) micro-batch
                state.epoch, state.batch = epoch + 1, 0
        mine = step_indices[world.rank * accumulation:(world.rank + 1) * accumulation]
        for indices in mine:
            yield to_device(collate([dataset[i] for i in indices]), device)


class DeviceLoader:
    """A DataLoader whose batches are moved to `device`, unsharded: evaluation runs the same batches
    on every rank (FSDP2's forward is collective, so all ranks must run the same number of them)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self):
        return len(self.loader)
