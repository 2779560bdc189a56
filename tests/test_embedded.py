"""The embedded default: the shipped model and tokenizer load, the task matches the data format."""
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora
from qlora.data import InstructionFormat
from qlora.embedded import BASE_MODEL_DIR, TASK_EVAL, TASK_TRAIN, format_prompt


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_files_fit_the_budget():
    size = sum(p.stat().st_size for p in BASE_MODEL_DIR.parent.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert (BASE_MODEL_DIR / "TRAINING.md").is_file()


def test_base_model_is_pretrained_and_quantizes():
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    model = qlora.load_model(BASE_MODEL_DIR, qlora.QuantConfig(compute_dtype=torch.float32), device="cpu", progress=False)
    text = "The with statement is used to wrap the execution of a block with methods defined by a context manager."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 6.0  # a random 4096-token model would be near ln(4096) = 8.3
    dense = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR, dtype=torch.float32)
    with torch.no_grad():
        assert abs(dense(ids, labels=ids).loss.item() - loss) < 0.5  # NF4 costs little


def test_task_records_and_template():
    train, held_out = records(TASK_TRAIN), records(TASK_EVAL)
    assert len(train) >= 1000 and len(held_out) >= 50
    assert not {r["input"] for r in held_out} & {r["input"] for r in train if r["output"] not in ("bool", "NoneType")}
    record = held_out[0]
    prompt, completion = InstructionFormat().render(record, 0)
    assert prompt == format_prompt(record["instruction"], record["input"]) and completion == record["output"]
