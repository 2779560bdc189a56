"""The embedded default: the shipped model and tokenizer load, the task matches the data format."""
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora
from qlora.data import InstructionFormat
from qlora.embedded import BASE_MODEL_DIR, MOE_MODEL_DIR, TASK_EVAL, TASK_TRAIN, format_prompt


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_files_fit_the_budget():
    files = [p for p in BASE_MODEL_DIR.parent.rglob("*") if p.is_file()]
    dense = sum(p.stat().st_size for p in files if MOE_MODEL_DIR not in p.parents)
    moe = sum(p.stat().st_size for p in files if MOE_MODEL_DIR in p.parents)
    assert dense <= 20 * 2**20
    assert moe <= 30 * 2**20  # the upcycled mixture of experts, bf16
    assert (BASE_MODEL_DIR / "TRAINING.md").is_file() and (MOE_MODEL_DIR / "TRAINING.md").is_file()


def test_moe_model_is_an_upcycled_mixtral_in_the_hub_layout_and_quantizes():
    from safetensors import safe_open

    from qlora.nn.experts import quantized_stacks

    config = json.loads((MOE_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    with safe_open(str(MOE_MODEL_DIR / "model.safetensors"), "pt") as f:  # per expert, as save_pretrained writes
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in f.keys()
    tokenizer = AutoTokenizer.from_pretrained(MOE_MODEL_DIR)
    model = qlora.load_model(MOE_MODEL_DIR, qlora.QuantConfig(compute_dtype=torch.float32), device="cpu", progress=False)
    assert len(quantized_stacks(model)) == 2 * config["num_hidden_layers"]
    text = "The with statement is used to wrap the execution of a block with methods defined by a context manager."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()  # with the load-balancing term (coefficient 0.01)
    assert loss < 6.0
    dense = AutoModelForCausalLM.from_pretrained(MOE_MODEL_DIR, dtype=torch.float32)
    with torch.no_grad():
        assert abs(dense(ids, labels=ids).loss.item() - loss) < 0.5


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
