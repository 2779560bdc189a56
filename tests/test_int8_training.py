"""LLM.int8 bases in the recipe tree, in a training run, and in the export: merged into dequant(int8 W)
in fp32, and re-quantized to int8 with the error reported."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import qlora
from qlora.export import export_merged
from qlora.train.recipes import quant_config
from qlora.train.schema import ConfigError, register
from qlora.train.recipe_checks import validate
from tiny_run import overrides, save_tiny_model_with_tokenizer, write_copy_task

ROOT = Path(__file__).resolve().parents[1]
register()


def compose_with(*extra):
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        return compose(config_name="config", overrides=list(extra))


def test_int8_preset_and_group_compose_and_validate():
    cfg = compose_with("recipe=llama7b_int8")
    validate(cfg)
    assert cfg.quantization.quant_type == "int8" and cfg.quantization.threshold == 6.0
    assert cfg.quantization.compute_dtype == "bfloat16" and cfg.trainer.run_name == "llama7b_int8"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (64, 16, "all-linear")
    qconfig = quant_config(cfg.quantization)
    assert isinstance(qconfig, qlora.Int8Config) and qconfig.threshold == 6.0
    with pytest.raises(ConfigError, match="quantization.threshold must be >= 0, got -1.0"):
        validate(compose_with("quantization=int8", "quantization.threshold=-1.0"))


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """A few steps of `python train.py quantization=int8` on the tiny model, in fp32 compute."""
    from qlora.train import run

    base = tmp_path_factory.mktemp("int8run")
    assets = save_tiny_model_with_tokenizer(base / "model"), write_copy_task(base / "task.jsonl")
    run_dir = base / "run"
    extra = {"quantization": "int8", "quantization.compute_dtype": "float32", "trainer.max_steps": 4,
             "trainer.eval_every": 0, "trainer.save_every": 0, "lora.target_modules": "[q_proj,v_proj,down_proj]",
             "lora.init_lora_weights": "false"}
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[o for o in overrides(*assets, run_dir, **extra)
                                                       if not o.startswith("hydra.")])
    summary = run(cfg, run_dir=run_dir)
    return run_dir, assets[0], summary


def test_training_on_an_int8_base(int8_run):
    run_dir, _, summary = int8_run
    assert summary["steps"] == 4 and summary["tokens"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_export_merges_into_the_dequantized_int8_base_in_fp32(int8_run, tmp_path):
    run_dir, base_dir, _ = int8_run
    out = export_merged(run_dir, tmp_path / "merged", dtype="float32", progress=False)
    record = json.loads((out / "config.json").read_text())["qlora_merge"]
    assert record["quantization"]["format"] == "int8" and record["base"] == "dequantized"
    assert "dequant(int8(W))" in (out / "README.md").read_text()
    merged, original = load_file(out / "model.safetensors"), load_file(base_dir / "model.safetensors")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    scale = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    scale = scale["lora_alpha"] / scale["r"]
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.gate_proj.weight"):  # not adapted
        assert torch.equal(merged[name], qlora.Weight8bit.quantize(original[name]).dequantize(torch.float32))
    name = "model.layers.1.self_attn.q_proj"
    a = next(v for k, v in adapter.items() if name in k and "lora_A" in k)
    b = next(v for k, v in adapter.items() if name in k and "lora_B" in k)
    expected = qlora.Weight8bit.quantize(original[name + ".weight"]).dequantize(torch.float32) + scale * b @ a
    torch.testing.assert_close(merged[name + ".weight"], expected, rtol=0, atol=1e-6)


def test_export_int8_requantizes_and_reports_the_error(int8_run, tmp_path):
    run_dir, _, _ = int8_run
    out = export_merged(run_dir, tmp_path / "int8", format="int8", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["load_in_8bit"] and config["quantization_config"]["llm_int8_threshold"] == 6.0
    error = config["qlora_merge"]["int8_added_logit_error"]
    # Two int8 roundings (weights and activations, ~1/254 of a row's range each) on the merged weights:
    # a few percent of the logits' spread on average.
    assert 0 < error["mean_abs"] < 0.05 * error["reference_logit_std"] and error["mean_abs"] <= error["max_abs"]
    assert "re-quantized** to LLM.int8 (threshold 6.0)" in (out / "README.md").read_text()
    model = qlora.load_model(out, qlora.Int8Config(compute_dtype=torch.float32), device="cpu", progress=False)
    assert sum(isinstance(m, qlora.Linear8bit) for m in model.modules()) == 14
