"""quantization=none: the 16-bit LoRA baseline trains on the checkpoint's own weights and exports into them."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import qlora
from qlora.baseline import load_dense_model
from qlora.lora import attach_lora
from quality_runs import logits, relative_error, train_tiny
from tiny_run import save_tiny_model_with_tokenizer, write_copy_task
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("baseline_assets")
    return save_tiny_model_with_tokenizer(base / "model"), write_copy_task(base / "task.jsonl")


def test_dense_model_holds_the_checkpoint_weights(tmp_path):
    directory = save_tiny("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    model = load_dense_model(directory, torch.float32, device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    assert not any(isinstance(m, qlora.Linear4bit) for m in model.modules())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.Linear) and q_proj.weight.dtype == torch.float32
    # bf16 -> fp32 is exact: the baseline computes with W itself.
    assert torch.equal(q_proj.weight, reference.model.layers[0].self_attn.q_proj.weight.float())

    mixed = load_dense_model(directory, torch.bfloat16, dense_dtype=torch.float32, device="cpu")
    assert mixed.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert mixed.lm_head.weight.dtype == torch.float32 and mixed.model.embed_tokens.weight.dtype == torch.float32


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dense_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_every_dtype_pair_a_recipe_allows_runs_forward_and_backward(tmp_path, compute_dtype, dense_dtype):
    # `python train.py quantization=none` pairs an fp32 model (model.dtype on a CPU) with bf16 linears:
    # the linears cast their input and output as the quantized layers do, for every pair.
    directory = save_tiny("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    model = attach_lora(load_dense_model(directory, compute_dtype, dense_dtype, device="cpu"), r=4)
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=tokens, labels=tokens)
    assert out.logits.dtype == dense_dtype and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_quantized_checkpoint_is_refused(tmp_path):
    directory = save_tiny("llama", tmp_path / "bf16")
    qlora.save_model(qlora.load_model(directory, device="cpu", progress=False), tmp_path / "nf4")
    with pytest.raises(ValueError, match="quantization=none needs a 16-bit checkpoint"):
        load_dense_model(tmp_path / "nf4", torch.float32)


def test_run_trains_dense_and_exports_into_w(assets, tmp_path):
    from qlora.evaluate import load_for_eval
    from qlora.export import export_merged, read_merge_record

    run_dir = tmp_path / "run"
    summary = train_tiny(assets, run_dir, **{"quantization": "none", "quantization.compute_dtype": "float32"})
    assert summary["steps"] == 2 and summary["final_eval_loss"] > 0
    trained, _, described, _ = load_for_eval(run_dir, "cpu")
    assert described.startswith("16-bit base")
    assert not any(isinstance(m, qlora.Linear4bit) for m in trained.modules())

    merged_dir = export_merged(run_dir, tmp_path / "merged", dtype="float32", progress=False)
    record = read_merge_record(merged_dir)
    assert record["trained_on_quantized_base"] is False
    assert "quantization=none" in (merged_dir / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokens = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    # W + s B A against x W^T + s B A x, both fp32: rounding only.
    assert relative_error(logits(merged, tokens), logits(trained, tokens)) < 1e-5
