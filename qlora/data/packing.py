"""Packing tokenized examples into sequences of at most `max_seq_len` tokens.

Packing removes padding waste; it is exact (same loss as training on the examples one by one) only
when attention never crosses example boundaries and positions restart per example. The collator
builds that mask from `seq_lengths`; `position_ids` restart here. One more detail: the label of an
example's first token must be -100, or the causal shift would have the previous example's last
token predict it. tokenize_records already ensures that; pack_examples enforces it again for
datasets tokenized elsewhere.
"""
from __future__ import annotations

import datasets
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher

from qlora.data.errors import DataError
from qlora.data.tokenization import IGNORE_INDEX

PACKED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
    "position_ids": datasets.List(datasets.Value("int32")), "seq_lengths": datasets.List(datasets.Value("int32")),
})
PACKING_VERSION = 1  # part of the cache fingerprint: bump it when the packing logic changes


def _packs(dataset: datasets.Dataset, max_seq_len: int, batch_size: int = 1000):
    """Yield packs greedily, in dataset order, streaming the dataset in batches."""
    input_ids, labels, position_ids, seq_lengths = [], [], [], []
    row = 0
    for batch in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=batch_size):
        for ids, labs in zip(batch["input_ids"], batch["labels"]):
            if len(ids) > max_seq_len:
                raise DataError(f"example {row} is {len(ids)} tokens long, over max_seq_len={max_seq_len}, "
                                f"so it fits in no pack; tokenize with the same max_seq_len and truncation")
            if len(input_ids) + len(ids) > max_seq_len and input_ids:
                yield {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                       "seq_lengths": seq_lengths}
                input_ids, labels, position_ids, seq_lengths = [], [], [], []
            input_ids += ids
            labels += [IGNORE_INDEX] + list(labs[1:])
            position_ids += range(len(ids))
            seq_lengths.append(len(ids))
            row += 1
    if input_ids:
        yield {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lengths": seq_lengths}


def pack_examples(dataset: datasets.Dataset, max_seq_len: int) -> datasets.Dataset:
    """Greedily pack tokenized examples, in order, into sequences of at most `max_seq_len` tokens; no
    example is split across packs. Columns: `input_ids`, `labels`, `position_ids` (restarting at 0
    for each example) and `seq_lengths` (the lengths of the examples in the pack, in order)."""
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise DataError(f"pack_examples needs tokenized examples, and the dataset lacks {sorted(missing)}; "
                        f"run tokenize_records first")
    # from_generator caches by fingerprint; derive it from the input dataset's so that a cached pack
    # set is reused only for the same examples and max_seq_len.
    fingerprint = Hasher.hash(("pack_examples", PACKING_VERSION, dataset._fingerprint, max_seq_len))
    try:
        return datasets.Dataset.from_generator(_packs, features=PACKED_FEATURES, fingerprint=fingerprint,
                                               gen_kwargs={"dataset": dataset, "max_seq_len": max_seq_len})
    except DatasetGenerationError as error:
        # The builder wraps whatever the generator raises; our own errors should reach the user as is.
        if isinstance(error.__cause__, DataError):
            raise error.__cause__ from None
        raise
