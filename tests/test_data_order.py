"""The order examples are drawn in: the seeded permutation, grouping by length, resume and ranks."""
import random

import pytest
import torch

from qlora.data.collate import Collator
from qlora.data.order import GROUP_BATCHES, epoch_order, example_lengths
from qlora.distributed.data import rank_micro_batches
from qlora.distributed.world import World
from qlora.train.state import TrainerState
from qlora.train.trainer import EpochSampler


def lengths_of(size, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 90) for _ in range(size)]


def test_without_lengths_the_order_is_the_seeded_permutation_runs_always_used():
    # Checkpoints written before grouping existed resume into this very order.
    assert epoch_order(1000, 7, 2) == torch.randperm(1000, generator=torch.Generator().manual_seed(9)).tolist()


@pytest.mark.parametrize("size,batch", [(1000, 8), (997, 16), (37, 4), (5, 8)])
def test_grouped_order_sorts_each_random_mega_batch_longest_first(size, batch):
    lengths = lengths_of(size)
    plain, grouped = epoch_order(size, 3, 1), epoch_order(size, 3, 1, lengths, batch)
    assert sorted(grouped) == list(range(size))
    group = max(1, min(GROUP_BATCHES, size // (4 * batch))) * batch
    # transformers' LengthGroupedSampler: each mega-batch of the permutation sorted longest first
    # (stable), then the heads of the first and of the longest mega-batch swapped.
    expected = [sorted(plain[s:s + group], key=lambda i: -lengths[i]) for s in range(0, size, group)]
    top = max(range(len(expected)), key=lambda g: lengths[expected[g][0]])
    expected[0][0], expected[top][0] = expected[top][0], expected[0][0]
    assert grouped == [i for chunk in expected for i in chunk]
    assert lengths[grouped[0]] == max(lengths)  # the most memory-hungry micro-batch comes first
    assert grouped == epoch_order(size, 3, 1, lengths, batch)  # deterministic
    if size >= 2 * group:  # several mega-batches: a new draw every epoch (one is one sorted list)
        assert grouped != epoch_order(size, 3, 2, lengths, batch)


def test_grouping_removes_most_padding():
    size, batch = 2000, 16
    lengths = lengths_of(size, 1)

    def padded(order):
        return sum(max(lengths[i] for i in order[s:s + batch]) * len(order[s:s + batch]) for s in range(0, size, batch))

    real = sum(lengths)
    plain, grouped = padded(epoch_order(size, 0, 0)), padded(epoch_order(size, 0, 0, lengths, batch))
    assert grouped < 1.05 * real < plain  # uniform 3..90: ~1.8x padded at random, <5% grouped


def test_resuming_mid_epoch_replays_the_grouped_order():
    lengths = lengths_of(300)
    whole = list(EpochSampler(300, 5, 0, 0, lengths, 8))
    assert whole == epoch_order(300, 5, 0, lengths, 8)
    assert list(EpochSampler(300, 5, 0, 24, lengths, 8)) == whole[24:]


def test_ranks_draw_the_single_process_micro_batches_grouped_too():
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths_of(96, 2)]
    lengths, collate = example_lengths({"input_ids": [e["input_ids"] for e in examples]}), Collator(0)
    single = list(EpochSampler(96, 1, 0, 0, lengths, 4))
    expected = [single[i:i + 4] for i in range(0, 96, 4)]
    for rank in range(2):
        world = World(strategy="ddp", rank=rank, size=2)
        state = TrainerState()
        stream = rank_micro_batches(examples, collate, state, 4, 1, 1, world, torch.device("cpu"), lengths)
        mine = [next(stream)["input_ids"].shape for _ in range(6)]
        # Steps of 2 micro-batches (one a rank): rank r takes micro-batch 2k + r of the single stream.
        assert mine == [(4, max(lengths[i] for i in expected[2 * k + rank])) for k in range(6)]
        assert (state.epoch, state.batch) == (0, 12)
