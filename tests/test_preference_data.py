"""Preference data: text and chat pairs, implicit prompts, KTO's unpaired records, truncation that keeps
the prompt's end, errors that name the record, the batch layout, and the recipe checks."""
import json
import warnings

import datasets
import pytest

from qlora.data import DataError, PreferenceFormat, UnpairedFormat
from qlora.data.preference import (PairCollator, UnpairedCollator, fit_to_length, prepare_preference_datasets,
                                   tokenize_pairs, tokenize_unpaired)
from qlora.data.tokenization import IGNORE_INDEX
from tiny_run import save_tiny_model_with_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny"))
    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def records(*rows) -> datasets.Dataset:
    return datasets.Dataset.from_list(list(rows))


def words(tokenizer, ids) -> str:
    return tokenizer.decode(ids)


def test_text_pairs_explicit_and_implicit_prompt_tokenize_alike(tokenizer):
    explicit = tokenize_pairs(records({"prompt": "w1 w2", "chosen": " w3 w5", "rejected": " w4"}), tokenizer,
                              PreferenceFormat(), max_seq_len=32)
    implicit = tokenize_pairs(records({"chosen": "w1 w2 w3 w5", "rejected": "w1 w2 w4"}), tokenizer,
                              PreferenceFormat(), max_seq_len=32)
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert explicit[0][name] == implicit[0][name], name
    row = explicit[0]
    assert words(tokenizer, row["prompt_ids"]) == "w1 w2"
    assert words(tokenizer, row["chosen_ids"]) == "w3 w5 </s>" and words(tokenizer, row["rejected_ids"]) == "w4 </s>"


def test_chat_pairs_explicit_and_implicit_prompt_render_alike(tokenizer):
    user = [{"role": "user", "content": "w1 w2"}]
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    explicit = tokenize_pairs(records({"prompt": user, "chosen": answer("w3"), "rejected": answer("w4 w6")}), tokenizer,
                              PreferenceFormat(), max_seq_len=64)
    implicit = tokenize_pairs(records({"chosen": user + answer("w3"), "rejected": user + answer("w4 w6")}), tokenizer,
                              PreferenceFormat(), max_seq_len=64)
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert explicit[0][name] == implicit[0][name], name
    assert explicit[0]["prompt"].endswith("<s> assistant ")  # the generation prompt closes the prompt
    assert words(tokenizer, explicit[0]["chosen_ids"]).startswith("w3 </s>")


def test_kto_records_and_pairs_split_into_desirable_and_undesirable(tokenizer):
    rows = [{"prompt": "w1", "completion": " w2"}, {"prompt": "w3", "completion": " w4"},
            {"prompt": "w5", "completion": " w6"}]
    for labels in ([True, False, True], [1, 0, 1], ["true", "False", "TRUE"]):  # as JSON, CSV give them
        unpaired = tokenize_unpaired(records(*[{**r, "label": v} for r, v in zip(rows, labels)]),
                                     tokenizer, UnpairedFormat(), max_seq_len=16)
        assert unpaired["label"] == [True, False, True] and unpaired["example_index"] == [0, 1, 2]
    # each prompt meets the completion half the set away (cyclically), never its own
    assert [words(tokenizer, ids) for ids in unpaired["kl_completion_ids"]] == ["w4 </s>", "w6 </s>", "w2 </s>"]
    pairs = tokenize_unpaired(records({"prompt": "w1", "chosen": " w2", "rejected": " w3"},
                                      {"prompt": "w4", "chosen": " w5", "rejected": " w6"}),
                              tokenizer, PreferenceFormat(), max_seq_len=16)
    assert pairs["label"] == [True, False, True, False]
    assert [words(tokenizer, ids) for ids in pairs["completion_ids"]] == ["w2 </s>", "w3 </s>", "w5 </s>", "w6 </s>"]
    assert pairs["kl_completion_ids"][0] == pairs["completion_ids"][2]  # another prompt's completion
    with pytest.raises(DataError, match=r"record 0: field 'label' must be true \(desirable\) or false"):
        tokenize_unpaired(records({"prompt": "w1", "completion": " w2", "label": "maybe"}), tokenizer,
                          UnpairedFormat(), max_seq_len=16)


def test_truncation_keeps_the_prompt_end_and_counts_the_pairs_cut(tokenizer):
    long_prompt = " ".join(f"w{i}" for i in range(10, 40))
    data = records({"prompt": long_prompt, "chosen": " w1 w2", "rejected": " w3"},
                   {"prompt": "w5", "chosen": " w6", "rejected": " w7"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tokenize_pairs(data, tokenizer, PreferenceFormat(), max_seq_len=12)
    assert any("truncated 1 of 2 pairs to data.max_seq_len=12" in str(w.message) for w in caught)
    row = out[0]
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == 12
    assert words(tokenizer, row["prompt_ids"]) == " ".join(f"w{i}" for i in range(31, 40))  # its end
    assert words(tokenizer, row["chosen_ids"]) == "w1 w2 </s>"  # completions whole
    with pytest.raises(DataError, match=r"record 0 is 33 tokens long .* over max_seq_len=12; set data.truncation=true"):
        tokenize_pairs(data, tokenizer, PreferenceFormat(), max_seq_len=12, truncation=False)
    # completions longer than half the window are cut at their end; the prompt keeps half
    prompt, (chosen,), cut = fit_to_length(list(range(20)), [list(range(100, 120))], 16, keep_first=1)
    assert cut and prompt == [0] + list(range(13, 20)) and chosen == list(range(100, 108))


def test_a_missing_field_names_the_record(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "w1", "chosen": " w2", "rejected": " w3"}) + "\n"
                    + json.dumps({"prompt": "w1", "chosen": " w2"}) + "\n")
    with pytest.raises(DataError, match=r"record 1: missing field 'rejected' \(fields present: chosen, prompt\)"):
        prepare_preference_datasets(tokenizer, source=str(path), format=PreferenceFormat(), max_seq_len=16,
                                    eval_fraction=0)
    with pytest.raises(DataError, match=r"record 0: no 'prompt' field, and 'chosen' and 'rejected' share no"):
        tokenize_pairs(records({"chosen": "w1", "rejected": "w2"}), tokenizer, PreferenceFormat(), max_seq_len=16)


def test_pair_batch_is_chosen_rows_then_rejected_rows_with_completion_labels_only():
    batch = PairCollator(pad_token_id=0)([
        {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2], "example_index": 4},
        {"prompt_ids": [1, 5], "chosen_ids": [10, 2], "rejected_ids": [11, 2], "example_index": 0}])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0], [1, 5, 10, 2, 0, 0],
                                           [1, 5, 6, 8, 9, 2], [1, 5, 11, 2, 0, 0]]
    I = IGNORE_INDEX  # noqa: E741
    assert batch["labels"].tolist() == [[I, I, I, 7, 2, I], [I, I, 10, 2, I, I], [I, I, I, 8, 9, 2], [I, I, 11, 2, I, I]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 4, 6, 4] and batch["example_index"].tolist() == [4, 0]
    kto = UnpairedCollator(pad_token_id=0)([
        {"prompt_ids": [1, 5], "completion_ids": [7, 2], "kl_completion_ids": [8, 8, 2], "label": True,
         "example_index": 0}])
    assert kto["desirable"].tolist() == [True] and kto["kl_input_ids"].tolist() == [[1, 5, 8, 8, 2]]
    assert kto["kl_labels"].tolist() == [[I, I, 8, 8, 2]]


@pytest.mark.parametrize("overrides, message", [
    (["objective=dpo"], r"objective=dpo needs qlora.data.PreferenceFormat data, and data.format._target_ is "
                        r"qlora.data.InstructionFormat; set data.format._target_=qlora.data.PreferenceFormat"),
    (["objective=dpo", "data=embedded_preferences", "objective.loss_type=ipo", "objective.label_smoothing=0.1"],
     r"objective.label_smoothing=0.1 applies to objective=dpo with loss_type=sigmoid and to objective=simpo"),
    (["objective=orpo", "data=embedded_preferences", "objective.precompute_reference=true"],
     r"objective=orpo has no reference model"),
    (["objective=dpo", "data=embedded_preferences", "objective.beta=0"], r"objective.beta must be a finite number > 0"),
    (["objective=dpo", "data=embedded_preferences", "objective.loss_type=kl"], r"objective.loss_type='kl' is not one"),
    (["objective=simpo", "data=embedded_preferences", "data.packing=true"], r"data.packing=true packs SFT examples"),
    (["objective=dpo", "data=embedded_preferences", "model.adapter=/nonexistent"],
     r"model.adapter=/nonexistent: no adapter_config.json there"),
    (["data.format._target_=qlora.data.UnpairedFormat"], r"objective=sft would train on KTO's undesirable"),
    (["objective=orpo", "data=embedded_preferences", "objective.sft_weight=1"], r"orpo has its own NLL term"),
])
def test_objective_values_are_refused_before_the_model_loads(overrides, message):
    from qlora.train.recipes import compose_recipe
    from qlora.train.schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose_recipe(overrides)


def test_every_objective_preset_composes():
    from qlora.train.recipes import compose_recipe

    for name in ("sft", "dpo", "orpo", "simpo", "kto"):
        cfg = compose_recipe([f"objective={name}", "data=embedded_preferences"])
        assert cfg.objective.name == name
    cfg = compose_recipe(["recipe=llama3_8b_dpo"])
    assert cfg.objective.name == "dpo" and cfg.objective.beta == 0.1 and cfg.data.format._target_.endswith("PreferenceFormat")
    assert compose_recipe([]).objective.name == "sft"  # today's behaviour stays the default
