"""`prepare_datasets`: the trainer's one call from a data config to model-ready datasets."""
from __future__ import annotations

from pathlib import Path

import datasets

from qlora.data.formats import RecordFormat
from qlora.data.loading import load_records
from qlora.data.packing import pack_examples
from qlora.data.tokenization import tokenize_records


def prepare_datasets(tokenizer, *, source: str | Path, format: RecordFormat, max_seq_len: int,
                     split: str = "train", eval_source: str | Path | None = None,
                     eval_split: str = "train", eval_fraction: float = 0.05, truncation: bool = True,
                     completion_only_loss: bool = True, packing: bool = False, add_eos: bool = True,
                     seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Load, tokenize and (with `packing`) pack: returns `(train, eval)`, eval None when there is no
    held-out set. The eval set is never packed, so its per-example loss stays exact and its `prompt`
    column is there for generation samples. Batch both with `Collator`."""
    train_records, eval_records = load_records(source, split=split, eval_source=eval_source,
                                               eval_fraction=eval_fraction, seed=seed, eval_split=eval_split)
    options = dict(tokenizer=tokenizer, format=format, max_seq_len=max_seq_len, truncation=truncation,
                   completion_only_loss=completion_only_loss, add_eos=add_eos)
    train = tokenize_records(train_records, **options)
    evaluation = tokenize_records(eval_records, **options) if eval_records is not None else None
    if packing:
        train = pack_examples(train, max_seq_len)
    return train, evaluation
