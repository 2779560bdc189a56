"""Preference data: (prompt, chosen, rejected) pairs and KTO's unpaired (prompt, completion, label).

Records come from the same readers as SFT data (`load_records`: local files, Hub datasets) and take
three shapes:

- explicit prompt: `prompt` + `chosen` + `rejected`, each a string, or lists of chat messages
  rendered with the tokenizer's chat template (`prompt` the conversation so far, `chosen` and
  `rejected` the assistant turn(s) that follow it);
- implicit prompt: no `prompt` field (or a null one); `chosen` and `rejected` are whole texts or
  conversations and the prompt is what they share: the common leading messages, or for text the
  longest common prefix;
- unpaired (KTO): `prompt` + `completion` + `label` (true = desirable). A paired source can also
  train KTO: each pair then gives one desirable and one undesirable example.

Tokens: prompt and completion are tokenized apart and concatenated, as SFT does, so the label
boundary is exact; the loss sees completion tokens only. Too long for `max_seq_len`: the prompt
keeps its end (the turn being answered) and the completions their start, and the number of pairs
cut is reported once.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch

from qlora.data.collate import Collator
from qlora.data.errors import DataError
from qlora.data.formats import RecordFormat, _present_fields
from qlora.data.loading import SOURCE_INDEX_COLUMN, load_records
from qlora.data.tokenization import IGNORE_INDEX, tokenizer_adds_bos

_IDS = datasets.List(datasets.Value("int32"))
PAIRED_FEATURES = datasets.Features({
    "prompt_ids": _IDS, "chosen_ids": _IDS, "rejected_ids": _IDS, "example_index": datasets.Value("int64"),
    "prompt": datasets.Value("string"), "completion": datasets.Value("string"),
    "rejected": datasets.Value("string"),
})
UNPAIRED_FEATURES = datasets.Features({
    "prompt_ids": _IDS, "completion_ids": _IDS, "label": datasets.Value("bool"),
    "example_index": datasets.Value("int64"), "prompt": datasets.Value("string"),
    "completion": datasets.Value("string"),
})


def _value(record: Mapping[str, Any], field: str, index: int, *, required: bool = True):
    """A text or a non-empty list of messages, or a DataError naming the record, the field and the fix."""
    if field not in record or (required and record[field] is None):
        raise DataError(f"record {index}: missing field {field!r} (fields present: {_present_fields(record)}); "
                        f"add it to the data or point the format at the right field name")
    value = record[field]
    if value is None:
        return None
    if isinstance(value, str):
        if required and not value.strip():
            raise DataError(f"record {index}: field {field!r} is empty; remove the record or fill in the field")
        return value
    if isinstance(value, list) and value and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        # Arrow gives every message the union of all keys, null where a message lacks one.
        return [{k: v for k, v in m.items() if v is not None} for m in value]
    raise DataError(f"record {index}: field {field!r} must be a string or a non-empty list of "
                    f"{{'role', 'content'}} messages, got {value!r:.80}")


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def _render_chat(tokenizer, prompt: list, completion: list, index: int) -> tuple[str, str]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"record {index}: chat messages need a tokenizer with a chat template, and "
                        f"{type(tokenizer).__name__} has none; set tokenizer.chat_template or give the pairs as text")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(f"record {index}: the chat template renders the prompt ({prompt_text[-60:]!r}) as something "
                        f"that is not a prefix of the whole conversation, so the completion cannot be cut out "
                        f"exactly; use a template whose generation prompt matches the assistant turn header")
    return prompt_text, full[len(prompt_text):]


def split_prompt(prompt, chosen, rejected, index: int, tokenizer=None) -> tuple[str, str, str]:
    """(prompt text, chosen completion text, rejected completion text) from the three record values."""
    if prompt is None:  # implicit prompt: what chosen and rejected share
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise DataError(f"record {index}: 'chosen' and 'rejected' must both be text or both be messages")
        if isinstance(chosen, list):
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            if shared == 0:
                raise DataError(f"record {index}: no 'prompt' field, and 'chosen' and 'rejected' share no leading "
                                f"message to serve as the prompt; add a 'prompt' field")
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        else:
            prompt = _common_prefix(chosen, rejected)
            # Keep at least one character of each completion: a completion that is a prefix of the other
            # would otherwise be empty.
            prompt = prompt[:min(len(prompt), len(chosen) - 1, len(rejected) - 1)]
            # Whole words only ("... w3" vs "... w4" share "... w"), and the space before the first
            # differing word goes with the completions, where BPE vocabularies keep it (" yes").
            if prompt and not prompt[-1].isspace() and not chosen[len(prompt)].isspace():
                prompt = prompt[:len(prompt) - len(prompt.split()[-1])] if prompt.split() else ""
            prompt = prompt.rstrip()
            if not prompt:
                raise DataError(f"record {index}: no 'prompt' field, and 'chosen' and 'rejected' share no "
                                f"leading text to serve as the prompt; add a 'prompt' field")
            return prompt, chosen[len(prompt):], rejected[len(prompt):]
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        return prompt, chosen, rejected
    as_messages = [v if isinstance(v, list) else [{"role": role, "content": v}]
                   for v, role in ((prompt, "user"), (chosen, "assistant"), (rejected, "assistant"))]
    prompt_text, chosen_text = _render_chat(tokenizer, as_messages[0], as_messages[1], index)
    _, rejected_text = _render_chat(tokenizer, as_messages[0], as_messages[2], index)
    return prompt_text, chosen_text, rejected_text


class PreferenceFormat(RecordFormat):
    """Pairs: `prompt` (optional: implicit when absent) + `chosen` + `rejected`, text or chat messages."""

    def __init__(self, prompt_field: str = "prompt", chosen_field: str = "chosen", rejected_field: str = "rejected"):
        self.prompt_field, self.chosen_field, self.rejected_field = prompt_field, chosen_field, rejected_field

    def render_pair(self, record: Mapping[str, Any], index: int, tokenizer=None) -> tuple[str, str, str]:
        prompt = _value(record, self.prompt_field, index, required=False) if self.prompt_field in record else None
        chosen = _value(record, self.chosen_field, index)
        rejected = _value(record, self.rejected_field, index)
        return split_prompt(prompt, chosen, rejected, index, tokenizer)

    def render(self, record, index, tokenizer=None):
        """(prompt, chosen): what SFT on the chosen answers, generation samples and exact match use."""
        prompt, chosen, _ = self.render_pair(record, index, tokenizer)
        return prompt, chosen

    def prompt_for(self, text, tokenizer=None):
        return text  # prompts were used as the data gave them (chat prompts arrive rendered)


def _label(value, index: int, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DataError(f"record {index}: field {field!r} must be true (desirable) or false (undesirable), got "
                    f"{value!r:.40}; write true/false (or 1/0)")


class UnpairedFormat(RecordFormat):
    """KTO's records: `prompt` + `completion` (text or messages) + `label` (true = desirable)."""

    def __init__(self, prompt_field: str = "prompt", completion_field: str = "completion", label_field: str = "label"):
        self.prompt_field, self.completion_field, self.label_field = prompt_field, completion_field, label_field

    def render_unpaired(self, record, index, tokenizer=None) -> tuple[str, str, bool]:
        prompt = _value(record, self.prompt_field, index, required=False)
        completion = _value(record, self.completion_field, index)
        if self.label_field not in record or record[self.label_field] is None:
            raise DataError(f"record {index}: missing field {self.label_field!r} (fields present: "
                            f"{_present_fields(record)}); KTO needs true (desirable) or false for every completion")
        label = _label(record[self.label_field], index, self.label_field)
        prompt = prompt if prompt is not None else ""
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt, completion, label
        as_messages = [v if isinstance(v, list) else [{"role": role, "content": v}]
                       for v, role in ((prompt, "user"), (completion, "assistant"))]
        prompt_text, completion_text = _render_chat(tokenizer, as_messages[0], as_messages[1], index)
        return prompt_text, completion_text, label

    def render(self, record, index, tokenizer=None):
        prompt, completion, _ = self.render_unpaired(record, index, tokenizer)
        return prompt, completion

    def prompt_for(self, text, tokenizer=None):
        return text


def fit_to_length(prompt_ids: list[int], completions: Sequence[list[int]], max_seq_len: int,
                  keep_first: int = 0) -> tuple[list[int], list[list[int]], bool]:
    """Cut (prompt + longest completion) to `max_seq_len`: the prompt keeps its end, down to half the
    window at most, and the completions keep their start. `keep_first`: leading prompt tokens that are
    always kept (a bos). Returns the cut ids and whether anything was cut."""
    longest = max(len(c) for c in completions)
    if len(prompt_ids) + longest <= max_seq_len:
        return prompt_ids, [list(c) for c in completions], False
    budget = max(max_seq_len - longest, min(len(prompt_ids), max_seq_len // 2))
    if budget < len(prompt_ids):
        head = prompt_ids[:keep_first]
        prompt_ids = head + prompt_ids[len(prompt_ids) - (budget - len(head)):] if budget > len(head) else head
    room = max_seq_len - len(prompt_ids)
    return prompt_ids, [list(c[:room]) for c in completions], True


class _Tokenizer:
    """Prompt and completion texts to ids, with bos/eos as tokenize_records adds them."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise DataError(f"{type(tokenizer).__name__} has no eos token; set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.eos = tokenizer.eos_token_id

    def prompts(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [([self.bos] + p if self.bos is not None and p[:1] != [self.bos] else p) for p in ids]

    def completions(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [c if c[-1:] == [self.eos] else c + [self.eos] for c in ids]


def _records(batch: dict[str, list], indices: list[int]):
    record_ids = batch[SOURCE_INDEX_COLUMN] if SOURCE_INDEX_COLUMN in batch else indices
    fields = [name for name in batch if name != SOURCE_INDEX_COLUMN]
    return record_ids, [dict(zip(fields, values)) for values in zip(*(batch[name] for name in fields))]


def _too_long(index: int, length: int, max_seq_len: int) -> DataError:
    return DataError(f"record {index} is {length} tokens long (prompt + longest completion), over max_seq_len="
                     f"{max_seq_len}; set data.truncation=true to keep the prompt's end, raise data.max_seq_len, "
                     f"or shorten the record")


def tokenize_pairs(dataset: datasets.Dataset, tokenizer, format: PreferenceFormat, max_seq_len: int,
                   truncation: bool = True) -> datasets.Dataset:
    """Pairs as `prompt_ids`, `chosen_ids`, `rejected_ids` (+ texts and `example_index`, the row's position,
    which keys precomputed reference log-probs). Warns once with the number of pairs truncated."""
    ids = _Tokenizer(tokenizer)

    def tokenize_batch(batch, indices):
        record_ids, records = _records(batch, indices)
        rendered = [format.render_pair(r, i, tokenizer) for r, i in zip(records, record_ids)]
        prompts = ids.prompts([p for p, _, _ in rendered])
        chosen = ids.completions([c for _, c, _ in rendered])
        rejected = ids.completions([r for _, _, r in rendered])
        out = {name: [] for name in PAIRED_FEATURES}
        for k, index in enumerate(record_ids):
            length = len(prompts[k]) + max(len(chosen[k]), len(rejected[k]))
            if length > max_seq_len and not truncation:
                raise _too_long(index, length, max_seq_len)
            p, (c, r), cut = fit_to_length(prompts[k], [chosen[k], rejected[k]], max_seq_len,
                                           keep_first=int(ids.bos is not None))
            out["prompt_ids"].append(p)
            out["chosen_ids"].append(c)
            out["rejected_ids"].append(r)
            out["example_index"].append(indices[k])
            out["prompt"].append(rendered[k][0])
            out["completion"].append(rendered[k][1])
            out["rejected"].append(rendered[k][2])
            cuts.append(cut)
        return out

    cuts: list[bool] = []
    tokenized = dataset.map(tokenize_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            features=PAIRED_FEATURES, desc="Tokenizing pairs", load_from_cache_file=False)
    _report_cuts(sum(cuts), len(tokenized), "pairs", max_seq_len)
    return tokenized


def tokenize_unpaired(dataset: datasets.Dataset, tokenizer, format: RecordFormat, max_seq_len: int,
                      truncation: bool = True) -> datasets.Dataset:
    """KTO examples as `prompt_ids`, `completion_ids`, `label`. A PreferenceFormat source gives two examples
    per pair: the chosen completion desirable, the rejected one undesirable."""
    ids = _Tokenizer(tokenizer)

    def tokenize_batch(batch, indices):
        record_ids, records = _records(batch, indices)
        rows = []
        for record, index in zip(records, record_ids):
            if isinstance(format, PreferenceFormat):
                prompt, chosen, rejected = format.render_pair(record, index, tokenizer)
                rows += [(index, prompt, chosen, True), (index, prompt, rejected, False)]
            else:
                rows.append((index, *format.render_unpaired(record, index, tokenizer)))
        prompts = ids.prompts([r[1] for r in rows])
        completions = ids.completions([r[2] for r in rows])
        out = {name: [] for name in UNPAIRED_FEATURES}
        for (index, prompt, completion, label), p, c in zip(rows, prompts, completions):
            if len(p) + len(c) > max_seq_len and not truncation:
                raise _too_long(index, len(p) + len(c), max_seq_len)
            p, (c,), cut = fit_to_length(p, [c], max_seq_len, keep_first=int(ids.bos is not None))
            out["prompt_ids"].append(p)
            out["completion_ids"].append(c)
            out["label"].append(label)
            out["example_index"].append(0)  # numbered below: a pair gives two rows
            out["prompt"].append(prompt)
            out["completion"].append(completion)
            cuts.append(cut)
        return out

    cuts: list[bool] = []
    tokenized = dataset.map(tokenize_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            features=UNPAIRED_FEATURES, desc="Tokenizing examples", load_from_cache_file=False)
    tokenized = tokenized.remove_columns("example_index").add_column("example_index", list(range(len(tokenized))))
    # KTO's reference point is estimated on mismatched sequences: prompt i with the completion of example
    # i + N/2 (cyclically). A fixed partner, not one from the micro-batch, so the reference log-prob of
    # the mismatched sequence can be precomputed; half the set away, so that the two examples a pair
    # gives (neighbours here) never meet.
    completions = tokenized["completion_ids"]
    offset = max(1, len(completions) // 2)
    tokenized = tokenized.add_column("kl_completion_ids", [completions[(i + offset) % len(completions)]
                                                           for i in range(len(completions))],
                                     feature=_IDS)
    labels = tokenized["label"]
    if all(labels) or not any(labels):
        warnings.warn(f"every KTO example is {'desirable' if labels and labels[0] else 'undesirable'}; KTO learns "
                      "from both kinds, so add examples with the other label", stacklevel=2)
    _report_cuts(sum(cuts), len(tokenized), "examples", max_seq_len)
    return tokenized


def _report_cuts(cut: int, total: int, what: str, max_seq_len: int) -> None:
    if cut:
        warnings.warn(f"truncated {cut} of {total} {what} to data.max_seq_len={max_seq_len} (prompts keep their "
                      f"end, completions their start); raise data.max_seq_len to keep them whole", stacklevel=3)


def prepare_preference_datasets(tokenizer, *, source, format: RecordFormat, max_seq_len: int, unpaired: bool = False,
                                split: str = "train", eval_source=None, eval_split: str = "train",
                                eval_fraction: float = 0.05, truncation: bool = True, seed: int = 0):
    """(train, eval) tokenized pairs (or KTO examples with `unpaired`), eval None without a held-out set."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    train_records, eval_records = load_records(source, split=split, eval_source=eval_source,
                                               eval_fraction=eval_fraction, seed=seed, eval_split=eval_split)
    if unpaired:
        tokenize = lambda records: tokenize_unpaired(records, tokenizer, format, max_seq_len, truncation)  # noqa: E731
    else:
        tokenize = lambda records: tokenize_pairs(records, tokenizer, format, max_seq_len, truncation)  # noqa: E731
    return tokenize(train_records), (tokenize(eval_records) if eval_records is not None else None)


def _sequence(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> dict:
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)
    labels[0] = IGNORE_INDEX  # no token predicts position 0
    return {"input_ids": list(prompt_ids) + list(completion_ids), "labels": labels}


class PairCollator:
    """One batch of B pairs as 2B rows: the chosen sequences first, then the rejected ones, padded together
    so that policy (and reference) score both in one forward. `example_index` [B] keys precomputed
    reference log-probs; every other key is what `Collator` makes."""

    def __init__(self, pad_token_id: int):
        self.collate = Collator(pad_token_id)

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        rows = ([_sequence(e["prompt_ids"], e["chosen_ids"]) for e in examples]
                + [_sequence(e["prompt_ids"], e["rejected_ids"]) for e in examples])
        batch = self.collate(rows)
        batch["example_index"] = torch.tensor([int(e["example_index"]) for e in examples], dtype=torch.long)
        return batch


class UnpairedCollator:
    """KTO's batch: the examples, `desirable` [N], and with `kl` the mismatched sequences (each prompt with
    its `kl_completion_ids`, see tokenize_unpaired) whose log-ratio estimates KTO's reference point."""

    def __init__(self, pad_token_id: int, kl: bool = True):
        self.collate, self.kl = Collator(pad_token_id), kl

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        batch = self.collate([_sequence(e["prompt_ids"], e["completion_ids"]) for e in examples])
        batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
        batch["example_index"] = torch.tensor([int(e["example_index"]) for e in examples], dtype=torch.long)
        if self.kl:
            shifted = [_sequence(e["prompt_ids"], e["kl_completion_ids"]) for e in examples]
            batch.update({f"kl_{k}": v for k, v in self.collate(shifted).items()})
        return batch


def batch_view(batch: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's inputs (and labels) of a collated batch; prefix "kl_" for KTO's mismatched sequences."""
    return {k: batch[prefix + k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}

