"""Tokenizing rendered records into `input_ids` / `labels` with an exact prompt/completion boundary."""
from __future__ import annotations

import warnings

import datasets

from qlora.data.errors import DataError
from qlora.data.formats import RecordFormat
from qlora.data.loading import SOURCE_INDEX_COLUMN

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and transformers' losses) skip
# Declared rather than inferred: a first batch whose examples are all dropped would otherwise fix
# the column types from empty lists. int32 halves the cache size; the collator makes int64 tensors.
TOKENIZED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
    "prompt": datasets.Value("string"), "completion": datasets.Value("string"),
})


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends its bos token when asked for special tokens (Llama does, GPT-2
    and Qwen do not); we add it by hand only in that case, so the model sees what it was trained on."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def tokenize_records(dataset: datasets.Dataset, tokenizer, format: RecordFormat, max_seq_len: int,
                     truncation: bool = True, completion_only_loss: bool = True,
                     add_eos: bool = True) -> datasets.Dataset:
    """Render each record with `format` and tokenize it.

    Returns a dataset with `input_ids`, `labels` (`-100` on the prompt when `completion_only_loss`,
    and always on position 0, which no token predicts), `prompt` and `completion` (the raw strings,
    for generation samples). Prompt and completion are tokenized separately and concatenated, so
    the label boundary is exact (at the cost of merges across it that a joint tokenization might
    make). bos is prepended when the tokenizer normally adds it (and the prompt does not already
    start with it, as chat templates often do); eos is appended when `add_eos` and not already there.

    Longer than `max_seq_len`: with `truncation` the first `max_seq_len` tokens are kept, otherwise
    a DataError names the record. Examples left with no supervised token (the completion truncated
    away) are dropped, with a warning giving their count: they would add nothing to the loss.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (one token to read, one to predict), got {max_seq_len}")
    if add_eos and tokenizer.eos_token_id is None:
        raise DataError(f"add_eos=True but {type(tokenizer).__name__} has no eos token; set "
                        f"tokenizer.eos_token or pass add_eos=False")
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    eos_id = tokenizer.eos_token_id if add_eos else None
    has_source_index = SOURCE_INDEX_COLUMN in dataset.column_names

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        record_ids = batch[SOURCE_INDEX_COLUMN] if has_source_index else indices
        fields = [name for name in batch if name != SOURCE_INDEX_COLUMN]  # ours, not the user's data
        records = [dict(zip(fields, values)) for values in zip(*(batch[name] for name in fields))]
        pairs = [format.render(record, index, tokenizer) for record, index in zip(records, record_ids)]
        prompts = [prompt for prompt, _ in pairs]
        completions = [completion for _, completion in pairs]
        # Special tokens come from the text (chat templates) or from the explicit bos/eos below only.
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "labels": [], "prompt": [], "completion": []}
        for index, prompt, completion, p_ids, c_ids in zip(record_ids, prompts, completions,
                                                           prompt_ids, completion_ids):
            if bos_id is not None and p_ids[:1] != [bos_id]:
                p_ids = [bos_id] + p_ids
            if eos_id is not None and c_ids[-1:] != [eos_id]:
                c_ids = c_ids + [eos_id]
            input_ids = p_ids + c_ids
            if len(input_ids) > max_seq_len:
                if not truncation:
                    raise DataError(f"record {index} is {len(input_ids)} tokens long, over max_seq_len="
                                    f"{max_seq_len}; set truncation=true to keep its first {max_seq_len} "
                                    f"tokens, raise max_seq_len, or shorten the record")
                input_ids = input_ids[:max_seq_len]
            prompt_labels = [IGNORE_INDEX] * len(p_ids) if completion_only_loss else list(p_ids)
            labels = (prompt_labels + c_ids)[:len(input_ids)]
            labels[0] = IGNORE_INDEX  # no token predicts position 0; packing relies on this (see packing.py)
            if all(label == IGNORE_INDEX for label in labels):
                continue  # nothing left to learn from: dropped, and counted by the caller
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            out["prompt"].append(prompt)
            out["completion"].append(completion)
        return out

    tokenized = dataset.map(tokenize_batch, batched=True, with_indices=True,
                            remove_columns=dataset.column_names, features=TOKENIZED_FEATURES,
                            desc="Tokenizing")
    dropped = len(dataset) - len(tokenized)
    if dropped:
        warnings.warn(f"dropped {dropped} of {len(dataset)} examples with no supervised token left (after "
                      f"truncation to max_seq_len={max_seq_len} the prompt fills the whole window); "
                      f"raise max_seq_len or shorten the prompts to keep them", stacklevel=2)
    if len(tokenized) == 0:
        raise DataError(f"no example is left after tokenization (all {len(dataset)} lost their completion "
                        f"to truncation at max_seq_len={max_seq_len}); raise max_seq_len")
    return tokenized
