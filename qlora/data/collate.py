"""Batching tokenized (or packed) examples into padded tensors.

Attention masks, as verified against transformers 5.23 (masking_utils.create_causal_mask):

- unpacked examples get the usual 2-D `[B, T]` 0/1 padding mask; the model adds causality.
- packed examples (those with `seq_lengths`) get a 4-D `[B, 1, T, T]` block-diagonal causal mask.
  transformers passes any 4-D mask to the attention function untouched. SDPA accepts a bool mask
  (True = attend) or an additive float one, but the eager implementation *adds* the mask to the
  scores, so a bool mask there silently adds 1 or 0 instead of masking. The collator therefore
  emits an additive float mask (0 = attend, finfo(dtype).min = blocked), correct for both. Its
  dtype is `mask_dtype`: "float32" by default, which eager (by type promotion) and torch's SDPA
  (it takes bool, float32 or the query dtype) accept with bf16/fp16 models too; passing the model's
  compute dtype halves the mask's memory. "bool" is allowed for SDPA-only setups.
- flash-attention backends take no 4-D mask: there, drop `attention_mask` from the batch and let
  the restarting `position_ids` delimit the examples (transformers derives the sequence boundaries
  from them). The same position_ids-only route works for sdpa/eager too, but only with
  `use_cache=False`: transformers skips the packed-sequence detection whenever a cache exists, and
  eval-mode models build one by default.

Padding tokens form one more causal block of their own, so every query row attends to at least
one key (a fully blocked row would give NaN in eager softmax); their labels are -100.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from qlora.data.tokenization import IGNORE_INDEX

MASK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "bool": torch.bool}


def block_causal_mask(seq_lengths: Sequence[Sequence[int]], total_length: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[B, 1, T, T]` mask where token i may attend to token j iff j <= i within the same example.
    Positions past `sum(seq_lengths[b])` (padding) form a block of their own."""
    segment_ids = torch.empty(len(seq_lengths), total_length, dtype=torch.long)
    for row, lengths in enumerate(seq_lengths):
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(lengths, dtype=torch.long))
        segment_ids[row, :len(ids)] = ids
        segment_ids[row, len(ids):] = len(lengths)  # the padding block
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(total_length, total_length, dtype=torch.bool).tril()
    allowed = (same_segment & causal)[:, None]
    if dtype == torch.bool:
        return allowed
    # Additive form: finfo.min rather than -inf, as transformers does, so no inf - inf NaN can appear.
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class Collator:
    """Pads a list of examples (dicts with `input_ids`, `labels`, optionally `position_ids` and
    `seq_lengths`; other keys such as `prompt` are ignored) into a dict of tensors: `input_ids`
    (right-padded with `pad_token_id`), `labels` (-100 on padding), `position_ids` and
    `attention_mask` (2-D for unpacked examples, 4-D additive block-causal for packed ones; see the
    module docstring). With `pad_to_multiple_of`, T is rounded up to a multiple of it."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, mask_dtype: str = "float32"):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos or unk token) "
                             "and pass tokenizer.pad_token_id")
        if mask_dtype not in MASK_DTYPES:
            raise ValueError(f"mask_dtype must be one of {sorted(MASK_DTYPES)}, got {mask_dtype!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_dtype = mask_dtype

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Collator got an empty list of examples")
        lengths = [len(example["input_ids"]) for example in examples]
        total = max(lengths)
        if self.pad_to_multiple_of:
            total = -(-total // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(examples)
        input_ids = torch.full((batch_size, total), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, total), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((batch_size, total), dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths)):
            input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(example["labels"], dtype=torch.long)
            positions = example.get("position_ids")
            position_ids[row, :length] = (torch.as_tensor(positions, dtype=torch.long) if positions is not None
                                          else torch.arange(length))
            # Padding counts from 0 like a new sequence, matching its own block in the packed mask.
            position_ids[row, length:] = torch.arange(total - length)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if any(example.get("seq_lengths") is not None for example in examples):
            # An unpacked example mixed into a packed batch is a pack of one.
            seq_lengths = [example.get("seq_lengths") or [length] for example, length in zip(examples, lengths)]
            for row, (lengths_in_pack, length) in enumerate(zip(seq_lengths, lengths)):
                if sum(lengths_in_pack) != length:
                    raise ValueError(f"example {row} of the batch has seq_lengths summing to "
                                     f"{sum(lengths_in_pack)} but {length} input_ids; re-run pack_examples")
            batch["attention_mask"] = block_causal_mask(seq_lengths, total, MASK_DTYPES[self.mask_dtype])
        else:
            batch["attention_mask"] = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
        return batch


def count_supervised_tokens(batch: Mapping[str, torch.Tensor] | torch.Tensor) -> int:
    """Label positions that contribute to the loss after the causal shift: `labels[:, 1:] != -100`.
    Use it to normalize a summed loss across gradient-accumulation steps."""
    labels = batch["labels"] if isinstance(batch, Mapping) else batch
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
