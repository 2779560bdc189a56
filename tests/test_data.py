"""Data pipeline: formats, loading, tokenization labels, packing and the packed-attention mask.

Everything is local: a WordLevel tokenizer built here (ids < 128, the tiny models' vocab) and tiny
json/jsonl/csv/parquet files in tmp dirs. The key test checks that a packed batch gives exactly the
loss of its examples run one by one, under both the sdpa and the eager attention implementations.
"""
import csv
import json

import datasets
import huggingface_hub.constants
import pytest
import torch
from tiny_models import VOCAB, build_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qlora.data import (IGNORE_INDEX, ChatFormat, Collator, DataError, InstructionFormat, PromptCompletionFormat,
                        TextFormat, count_supervised_tokens, load_records, pack_examples, prepare_datasets,
                        tokenize_records)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = [
    "### Instruction : Input : Response :",
    "the cat sat on the mat and the dog ran to the park",
    "add two and three . the answer is five",
    "name a colour . red green blue are colours",
    "what is the capital of france ? paris is the capital",
    "write a short poem about the sea waves roll in",
    "translate hello to french bonjour",
]
# A template whose assistant turns end with the eos token, so the completion already carries eos.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %} </s> {% else %} <|end|> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    # Like Llama's tokenizer: bos is added whenever special tokens are requested.
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 0 and len(tok) < VOCAB
    return tok


@pytest.fixture(autouse=True)
def _local_datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow caches of load_dataset/map/from_generator out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


QA = [{"prompt": "what is the capital of france ?", "completion": "paris is the capital"},
      {"prompt": "add two and three .", "completion": "the answer is five"},
      {"prompt": "name a colour .", "completion": "red"},
      {"prompt": "translate hello to french", "completion": "bonjour"}]


# ---------------------------------------------------------------- formats

def test_text_and_prompt_completion_formats():
    assert TextFormat().render({"text": "the cat"}, 0) == ("", "the cat")
    assert TextFormat(field="body").render({"body": "x"}, 0) == ("", "x")
    assert PromptCompletionFormat().render({"prompt": "a", "completion": "b"}, 0) == ("a", "b")
    fmt = PromptCompletionFormat(prompt_field="q", completion_field="a")
    assert fmt.render({"q": "", "a": "b"}, 0) == ("", "b")
    assert fmt.render({"q": None, "a": "b"}, 0) == ("", "b")  # CSV readers turn empty cells into nulls
    with pytest.raises(DataError, match="record 0: missing field 'q'"):
        fmt.render({"a": "b"}, 0)


def test_instruction_format_with_and_without_input():
    fmt = InstructionFormat()
    prompt, completion = fmt.render({"instruction": "add", "input": "2 3", "output": "5"}, 0)
    assert prompt == "### Instruction:\nadd\n\n### Input:\n2 3\n\n### Response:\n" and completion == "5"
    for record in ({"instruction": "add", "input": "", "output": "5"}, {"instruction": "add", "output": "5"},
                   {"instruction": "add", "input": None, "output": "5"}):
        assert fmt.render(record, 0)[0] == "### Instruction:\nadd\n\n### Response:\n"
    custom = InstructionFormat(instruction_field="q", output_field="a", template="Q {instruction} {input} A ")
    assert custom.render({"q": "x", "input": "y", "a": "z"}, 0) == ("Q x y A ", "z")
    with pytest.raises(ValueError, match="placeholder"):
        InstructionFormat(template="no fields here")


def test_chat_format(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", CHAT_TEMPLATE, raising=False)
    record = {"messages": [{"role": "user", "content": "add two and three ."},
                           {"role": "assistant", "content": "five"},
                           {"role": "user", "content": "name a colour ."},
                           {"role": "assistant", "content": "red"}]}
    prompt, completion = ChatFormat().render(record, 0, tokenizer)
    assert prompt.endswith("<|user|> name a colour . <|end|> <|assistant|>") and "five </s>" in prompt
    assert completion == " red </s> "
    # eos comes from the template; tokenize_records must not add a second one.
    tokenized = tokenize_records(datasets.Dataset.from_list([record]), tokenizer, ChatFormat(), 64)
    row = tokenized[0]
    assert row["input_ids"][-2:] == ids(tokenizer, "red </s>") and row["input_ids"][0] == tokenizer.bos_token_id
    assert [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX] == ids(tokenizer, "red </s>")
    with pytest.raises(DataError, match="record 0: the last message is from 'user'"):
        ChatFormat().render({"messages": record["messages"][:-1]}, 0, tokenizer)


def test_chat_format_without_template_is_a_clear_error(tokenizer):
    assert not tokenizer.chat_template
    with pytest.raises(DataError, match="chat template"):
        ChatFormat().render({"messages": [{"role": "assistant", "content": "hi"}]}, 0, tokenizer)


@pytest.mark.parametrize("fmt, record, message", [
    (PromptCompletionFormat(), {"prompt": "a"}, r"record 7: missing field 'completion' \(fields present: prompt\)"),
    (PromptCompletionFormat(), {"prompt": "a", "completion": "  "}, r"record 7: field 'completion' is empty"),
    (PromptCompletionFormat(), {"prompt": 3, "completion": "b"}, r"record 7: field 'prompt' must be a string, got int"),
    (TextFormat(), {"content": "x"}, r"record 7: missing field 'text'"),
    (InstructionFormat(), {"instruction": "x", "output": None}, r"record 7: missing field 'output'"),
    (ChatFormat(), {"messages": "hi"}, r"record 7: field 'messages' must be a non-empty list"),
])
def test_bad_records_name_the_index_and_problem(fmt, record, message, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", CHAT_TEMPLATE, raising=False)
    with pytest.raises(DataError, match=message):
        fmt.render(record, 7, tokenizer)


# ---------------------------------------------------------------- loading

def test_loads_json_jsonl_csv_parquet_and_directories(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", QA)
    (tmp_path / "a.json").write_text(json.dumps(QA))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(QA)
    datasets.Dataset.from_list(QA).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet"):
        train, evaluation = load_records(tmp_path / name, eval_fraction=0)
        assert evaluation is None and len(train) == 4, name
        assert train[0]["prompt"] == QA[0]["prompt"] and train[3]["completion"] == "bonjour", name
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "0.jsonl", QA[:3])
    write_jsonl(shards / "1.jsonl", QA[3:])
    train, _ = load_records(str(shards), eval_fraction=0)
    assert [r["completion"] for r in train] == [r["completion"] for r in QA]


def test_held_out_split_sizes_and_seed(tmp_path):
    records = [{"text": f"the cat {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    train, evaluation = load_records(path, eval_fraction=0.1, seed=3)
    assert (len(train), len(evaluation)) == (36, 4)
    assert sorted(list(train["source_index"]) + list(evaluation["source_index"])) == list(range(40))
    again_train, _ = load_records(path, eval_fraction=0.1, seed=3)
    assert list(again_train["source_index"]) == list(train["source_index"])
    assert len(load_records(path, eval_fraction=0.01)[1]) == 1  # at least one eval record
    other = write_jsonl(tmp_path / "eval.jsonl", records[:5])
    train, evaluation = load_records(path, eval_source=other)
    assert (len(train), len(evaluation)) == (40, 5)
    with pytest.raises(DataError, match="too few"):
        load_records(write_jsonl(tmp_path / "one.jsonl", records[:1]))


def test_missing_local_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records("./no/such/dir")


def test_hub_name_failure_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables at import, which happened already.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not load dataset 'someone/some-dataset'") as info:
        load_records("someone/some-dataset")
    message = str(info.value)
    assert "Hub may be unreachable" in message and "local .json/.jsonl/.csv/.parquet file" in message


# ---------------------------------------------------------------- tokenization

def test_completion_only_labels_are_exact_at_the_boundary(tokenizer):
    dataset = datasets.Dataset.from_list(QA[:1])
    row = tokenize_records(dataset, tokenizer, PromptCompletionFormat(), 64)[0]
    prompt_ids, completion_ids = ids(tokenizer, QA[0]["prompt"]), ids(tokenizer, QA[0]["completion"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert row["input_ids"] == [bos] + prompt_ids + completion_ids + [eos]
    assert row["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + completion_ids + [eos]
    assert (row["prompt"], row["completion"]) == (QA[0]["prompt"], QA[0]["completion"])
    full = tokenize_records(dataset, tokenizer, PromptCompletionFormat(), 64, completion_only_loss=False)[0]
    assert full["labels"] == [IGNORE_INDEX] + prompt_ids + completion_ids + [eos]  # position 0 never counts
    no_eos = tokenize_records(dataset, tokenizer, PromptCompletionFormat(), 64, add_eos=False)[0]
    assert no_eos["input_ids"][-1] == completion_ids[-1]


def test_text_format_supervises_every_token(tokenizer):
    row = tokenize_records(datasets.Dataset.from_list([{"text": "the cat sat"}]), tokenizer, TextFormat(), 64)[0]
    assert row["input_ids"] == [1] + ids(tokenizer, "the cat sat") + [2]
    assert row["labels"] == [IGNORE_INDEX] + row["input_ids"][1:]


def test_truncation_and_the_too_long_error(tokenizer):
    dataset = datasets.Dataset.from_list(QA)
    lengths = [len(r["input_ids"]) for r in tokenize_records(dataset, tokenizer, PromptCompletionFormat(), 64)]
    assert lengths == [13, 11, 7, 7]
    truncated = tokenize_records(dataset, tokenizer, PromptCompletionFormat(), 9)
    assert [len(r["input_ids"]) for r in truncated] == [9, 9, 7, 7]
    first = tokenize_records(dataset, tokenizer, PromptCompletionFormat(), 64)[0]
    assert truncated[0]["input_ids"] == first["input_ids"][:9] and truncated[0]["labels"] == first["labels"][:9]
    with pytest.raises(DataError, match=r"record 1 is 11 tokens long, over max_seq_len=9; set truncation=true"):
        tokenize_records(dataset.select([2, 1]).add_column("source_index", [2, 1]), tokenizer,
                         PromptCompletionFormat(), 9, truncation=False)


def test_fully_truncated_completion_is_dropped_with_a_warning(tokenizer):
    dataset = datasets.Dataset.from_list(QA)  # prompt lengths with bos: 8, 6, 5, 5
    with pytest.warns(UserWarning, match="dropped 2 of 4 examples"):
        kept = tokenize_records(dataset, tokenizer, PromptCompletionFormat(), 6)
    assert list(kept["completion"]) == ["red", "bonjour"]


def test_format_errors_name_the_source_row_after_the_split(tmp_path, tokenizer):
    records = [{"prompt": "a", "completion": "b"} for _ in range(9)] + [{"prompt": "a"}]
    train, evaluation = load_records(write_jsonl(tmp_path / "d.jsonl", records), eval_fraction=0.2)
    bad = train if 9 in train["source_index"] else evaluation
    with pytest.raises(DataError, match="record 9: missing field 'completion'"):
        tokenize_records(bad, tokenizer, PromptCompletionFormat(), 32)


# ---------------------------------------------------------------- packing and collation

def test_pack_examples_is_greedy_in_order_with_restarting_positions(tokenizer):
    tokenized = tokenize_records(datasets.Dataset.from_list(QA), tokenizer, PromptCompletionFormat(), 64)
    packed = pack_examples(tokenized, 20)  # lengths 13, 11, 7, 7
    assert list(packed["seq_lengths"]) == [[13], [11, 7], [7]]
    second = packed[1]
    assert second["position_ids"] == list(range(11)) + list(range(7))
    assert second["input_ids"] == tokenized[1]["input_ids"] + tokenized[2]["input_ids"]
    assert second["labels"] == tokenized[1]["labels"] + tokenized[2]["labels"]
    with pytest.raises(DataError, match="example 0 is 13 tokens long"):
        pack_examples(tokenized, 12)


def test_collator_pads_unpacked_examples(tokenizer):
    rows = list(tokenize_records(datasets.Dataset.from_list(QA[1:3]), tokenizer, PromptCompletionFormat(), 64))
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=4)(rows)  # lengths 11, 7 -> T = 12
    assert batch["input_ids"].shape == (2, 12) and batch["attention_mask"].tolist() == [[1] * 11 + [0],
                                                                                        [1] * 7 + [0] * 5]
    assert batch["input_ids"][1, 7:].tolist() == [0] * 5 and batch["labels"][1, 7:].tolist() == [IGNORE_INDEX] * 5
    assert batch["input_ids"][0, :11].tolist() == rows[0]["input_ids"]
    assert batch["position_ids"][1, :7].tolist() == list(range(7))
    assert count_supervised_tokens(batch) == sum(lab != IGNORE_INDEX for r in rows for lab in r["labels"])


def test_block_causal_mask_never_crosses_examples():
    batch = Collator(0)([{"input_ids": [5] * 5, "labels": [5] * 5, "position_ids": [0, 1, 2, 0, 1],
                          "seq_lengths": [3, 2]}, {"input_ids": [5] * 2, "labels": [5] * 2}])
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.float32
    allowed = (mask == 0)[:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert allowed[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    bool_mask = Collator(0, mask_dtype="bool")([{"input_ids": [5] * 3, "labels": [5] * 3, "seq_lengths": [2, 1]}])
    assert bool_mask["attention_mask"].dtype == torch.bool and bool_mask["attention_mask"][0, 0, 2].tolist() == [
        False, False, True]


def summed_token_loss(model, batch):
    """Sum of next-token cross-entropies over the supervised labels (shift done here, not by the model)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction="sum")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batch_has_the_loss_of_its_examples_run_one_by_one(attn_implementation, tokenizer):
    records = [{"text": "the cat sat on the mat"}, {"text": "paris is the capital of france"},
               {"text": "red"}, {"text": "write a short poem about the sea waves roll in"}]
    tokenized = tokenize_records(datasets.Dataset.from_list(records), tokenizer, TextFormat(), 16)
    packed = pack_examples(tokenized, 16)
    assert list(packed["seq_lengths"]) == [[8, 8], [3, 12]]  # two packs of two, of different total lengths
    model = build_model("llama")
    model.config._attn_implementation = attn_implementation

    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8)(list(packed))
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].shape == (2, 1, 16, 16)
    assert batch["position_ids"][1].tolist() == [0, 1, 2] + list(range(12)) + [0]  # restarts; padding too
    packed_loss = summed_token_loss(model, batch)

    one_by_one = sum(summed_token_loss(model, {"input_ids": torch.tensor([row["input_ids"]]),
                                               "labels": torch.tensor([row["labels"]])}) for row in tokenized)
    assert count_supervised_tokens(batch) == sum(len(row["input_ids"]) - 1 for row in tokenized)
    assert torch.isclose(packed_loss, one_by_one, rtol=1e-5, atol=0), (packed_loss, one_by_one)


def test_prepare_datasets_packs_train_only(tmp_path, tokenizer):
    records = [{"instruction": "add two and three", "input": "", "output": "five"},
               {"instruction": "name a colour", "input": "red green", "output": "blue"}] * 10
    path = write_jsonl(tmp_path / "i.jsonl", records)
    train, evaluation = prepare_datasets(tokenizer, source=path, format=InstructionFormat(), max_seq_len=32,
                                         eval_fraction=0.1, packing=True)
    assert set(train.column_names) == {"input_ids", "labels", "position_ids", "seq_lengths"}
    assert sum(len(s) for s in train["seq_lengths"]) == 18 and max(len(r) for r in train["input_ids"]) <= 32
    assert len(evaluation) == 2 and set(evaluation.column_names) == {"input_ids", "labels", "prompt", "completion"}
    assert evaluation[0]["prompt"].startswith("### Instruction:\n")
    batch = Collator(tokenizer.pad_token_id)(list(train.select(range(2))))
    assert batch["attention_mask"].dim() == 4
