"""LoftQ initialisation: the alternation, what is stored, the adapter, the logits, a run and its export."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import qlora
from qlora.lora import attach_lora
from qlora.loftq import LoftQError, checkpoint_weights, decompose, loftq_model
from qlora.train.recipes import compose_recipe
from qlora.train.schema import ConfigError
from quality_runs import logits, relative_error, train_tiny
from tiny_run import save_tiny_model_with_tokenizer, write_copy_task

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("loftq_assets")
    return save_tiny_model_with_tokenizer(base / "model"), write_copy_task(base / "task.jsonl")


def roundtrip(quant_type, double_quant, blocksize=64):
    return lambda t: qlora.dequantize_4bit(*qlora.quantize_4bit(t, quant_type, blocksize, double_quant), torch.float32)


def load_4bit(model_dir, quant_type="nf4"):
    config = qlora.QuantConfig(quant_type=quant_type, double_quant=quant_type == "nf4", compute_dtype=torch.float32)
    return qlora.load_model(model_dir, config, device="cpu", dtype=torch.float32, progress=False)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("shape", [(192, 64), (96, 160)])
def test_error_falls_with_iterations(quant_type, double_quant, shape):
    weight = torch.randn(*shape) * 0.02
    result = decompose(weight, rank=4, iterations=5, roundtrip=roundtrip(quant_type, double_quant))
    errors = [result.plain_error, *result.errors]
    # Iteration 1 quantizes W itself, then removes the best rank-4 part of the error: strictly below
    # plain init; each later quantization of a corrected weight has lowered the error further.
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert result.errors[-1] < 0.95 * result.plain_error
    # What is reported is what is stored: W - (dequant(Q(target)) + L R).
    assert torch.equal(result.dequantized, roundtrip(quant_type, double_quant)(result.target))
    direct = torch.linalg.matrix_norm(weight - result.dequantized - result.L @ result.R)
    assert abs(float(direct) - result.errors[-1]) <= 1e-5 * result.weight_norm


def test_rank_past_the_matrix_rank_pads_with_zeros():
    result = decompose(torch.randn(8, 64) * 0.02, rank=16, iterations=2, roundtrip=roundtrip("nf4", True))
    assert result.L.shape == (8, 16) and result.R.shape == (16, 64)
    assert not result.L[:, 8:].any() and not result.R[8:].any()
    assert result.errors[-1] < 1e-6 * result.weight_norm  # rank 8 covers an 8-row residual exactly


def test_bad_iterations_and_rank():
    with pytest.raises(LoftQError, match="loftq_iter must be >= 1"):
        decompose(torch.randn(8, 64), rank=2, iterations=0, roundtrip=roundtrip("nf4", True))
    with pytest.raises(LoftQError, match="rank"):
        decompose(torch.randn(8, 64), rank=0, iterations=1, roundtrip=roundtrip("nf4", True))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_stored_base_and_adapter(assets, quant_type):
    model_dir, _ = assets
    model = load_4bit(model_dir, quant_type)
    with checkpoint_weights(str(model_dir)) as weight:
        result = loftq_model(model, weight, rank=4, iterations=3)
    assert result.report["layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down); the head stays dense
    assert result.report["relative_error_loftq"][-1] < result.report["relative_error_loftq"][0] \
        < result.report["relative_error_plain"]
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    with checkpoint_weights(str(model_dir)) as weight:
        expected = decompose(weight(name), 4, 3, roundtrip(quant_type, quant_type == "nf4"))
    # The stored base is the quantization of the last residual-corrected weight, in the layer's own format.
    assert torch.equal(layer.dequantize(torch.float32), expected.dequantized)
    torch.testing.assert_close(result.factors[name][0], expected.L, rtol=0, atol=0)

    peft_model = attach_lora(model, r=4, lora_alpha=8, gradient_checkpointing=False)
    assert result.apply(peft_model) == 14
    wrapped = peft_model.get_base_model().get_submodule(name)
    a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
    added = wrapped.scaling["default"] * (b @ a)  # scaling = alpha / r = 2: the split divides it out
    L, R = expected.L, expected.R
    # fp32 rounding of a rank-4 product of O(sqrt(S)) factors: a few eps x sqrt(r) relative.
    assert relative_error(added, L @ R) < 8 * EPS32 * 4 ** 0.5


def test_loftq_logits_are_closer_to_the_16bit_model(assets):
    model_dir, _ = assets
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = torch.randint(4, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    want = logits(reference, tokens)

    plain = attach_lora(load_4bit(model_dir), r=8, lora_alpha=16, gradient_checkpointing=False)
    loftq_base = load_4bit(model_dir)
    with checkpoint_weights(str(model_dir)) as weight:
        result = loftq_model(loftq_base, weight, rank=8, iterations=4)
    loftq = attach_lora(loftq_base, r=8, lora_alpha=16, gradient_checkpointing=False)
    result.apply(loftq)
    plain_error = relative_error(logits(plain, tokens), want)
    loftq_error = relative_error(logits(loftq, tokens), want)
    assert loftq_error < plain_error, (loftq_error, plain_error)


def test_quantized_checkpoint_is_refused(assets, tmp_path):
    model_dir, _ = assets
    qlora.save_model(load_4bit(model_dir), tmp_path / "q")
    with pytest.raises(LoftQError, match="needs the 16-bit weights"):
        checkpoint_weights(str(tmp_path / "q"))


@pytest.mark.parametrize("overrides,message", [
    (["lora.init=loftq", "quantization=none"], "quantization=none has none"),
    (["lora.init=loftq", "lora.loftq_iter=0"], "loftq_iter must be >= 1"),
    (["lora.init=loftq", "lora.use_dora=true"], "use_dora"),
    (["lora.init=pissa"], "lora.init='pissa' is not one of"),
])
def test_recipe_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_recipe(overrides)


def test_run_exports_into_its_loftq_base(assets, tmp_path):
    from qlora.evaluate import load_for_eval
    from qlora.export import export_merged

    run_dir = tmp_path / "run"
    train_tiny(assets, run_dir, **{"lora.init": "loftq", "lora.loftq_iter": 2})
    report = json.loads((run_dir / "loftq.json").read_text())
    assert report["iterations"] == 2 and report["relative_error_loftq"][-1] < report["relative_error_plain"]
    assert (run_dir / "loftq_base" / "config.json").is_file()

    trained, _, described, _ = load_for_eval(run_dir, "cpu")
    assert "loftq_base" in described
    merged_dir = export_merged(run_dir, tmp_path / "merged", dtype="float32", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokens = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    want = logits(trained, tokens)
    # The same fp32 function computed two ways (x W^T + s B A x vs x (W + s B A)^T): fp32 rounding only.
    assert relative_error(logits(merged, tokens), want) < 1e-5
    # Merging into plain Q(W) instead would be wrong by the LoftQ correction of the base.
    # (A bare copy of the adapter, away from its run, names only the original base.)
    bare = shutil.copytree(run_dir / "adapter", tmp_path / "bare_adapter")
    wrong = AutoModelForCausalLM.from_pretrained(
        export_merged(bare, tmp_path / "wrong", dtype="float32", progress=False), dtype=torch.float32)
    assert relative_error(logits(wrong, tokens), want) > 1e-3
