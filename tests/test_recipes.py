"""Every recipe composes against the schema; unknown keys and bad values fail clearly."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from qlora.train.schema import ConfigError, register
from qlora.train.recipe_checks import validate

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
register()


def options():
    """(group, option) for every yaml in every config folder, recursively."""
    found = []
    for path in sorted(RECIPES.rglob("*.yaml")):
        if path.parent == RECIPES:
            continue
        group = path.parent.relative_to(RECIPES).as_posix()
        found.append((group, path.stem))
    return found


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_folder_is_covered():
    groups = {g for g, _ in options()}
    assert groups == {p.name for p in RECIPES.iterdir() if p.is_dir()}
    assert {"model", "quantization", "lora", "data", "optimizer", "scheduler", "trainer", "logger", "recipe"} <= groups


@pytest.mark.parametrize("group,option", options())
def test_option_composes_and_validates(group, option):
    # The preference objectives need pairs: alone, validation refuses the default instruction data.
    pairs = ["data=embedded_preferences"] if group == "objective" and option != "sft" else []
    cfg = compose_with(f"{group}={option}", *pairs)
    if group == "data" and cfg.data.source == "???":
        cfg.data.source = "my_chat.jsonl"  # chat.yaml asks the user for a source
    validate(cfg)


@pytest.mark.parametrize("preset", ["llama7b_nf4", "llama3_8b_nf4", "mistral7b_nf4", "qwen2_7b_nf4"])
def test_presets(preset):
    cfg = compose_with(f"recipe={preset}")
    validate(cfg)
    assert cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant
    assert cfg.quantization.compute_dtype == "bfloat16"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (64, 16, 0.05, "all-linear")
    assert cfg.optimizer.lr == 2e-4 and cfg.scheduler.name == "constant"
    assert cfg.trainer.max_grad_norm == 0.3 and cfg.trainer.gradient_checkpointing
    assert cfg.trainer.run_name == preset


@pytest.mark.parametrize("preset", ["qwen3_30b_a3b_nf4", "mixtral_8x7b_nf4", "gpt_oss_20b_nf4"])
def test_moe_presets(preset):
    cfg = compose_with(f"recipe={preset}")
    validate(cfg)
    assert cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant
    # Experts adapted too; PEFT's adapter on a 3-D parameter takes no dropout.
    assert (cfg.lora.r, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.target_experts) == (8, 0.0, "all-linear", True)
    assert cfg.optimizer._target_ == "qlora.optim.PagedAdamW" and cfg.optimizer.paged and cfg.trainer.gradient_checkpointing
    assert cfg.trainer.run_name == preset


def test_default_is_the_embedded_run():
    cfg = compose_with()
    validate(cfg)
    assert cfg.model.name_or_path == "embedded" and cfg.data.source == "embedded"


def test_command_line_overrides():
    cfg = compose_with("recipe=llama7b_nf4", "lora.r=16", "data.max_seq_len=4096", "trainer.max_steps=500", "logger=wandb")
    assert (cfg.lora.r, cfg.data.max_seq_len, cfg.trainer.max_steps, cfg.logger.backend) == (16, 4096, 500, "wandb")


def test_unknown_key_fails():
    with pytest.raises(ConfigCompositionException) as info:
        compose_with("lora.rank=16")
    assert "rank" in str(info.value.__cause__ or info.value)


def test_wrong_type_fails():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_with("trainer.max_steps=many")
    assert "max_steps" in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize("override,message", [
    ("quantization.quant_type=int4", "quantization.quant_type='int4' is not one of nf4, fp4, int8"),
    ("quantization.blocksize=48", "quantization.blocksize must be a power of two in [32, 4096], got 48"),
    ("lora.r=0", "lora.r must be > 0, got 0"),
    ("trainer.mixed_precision=fp8", "trainer.mixed_precision='fp8' is not one of no, bf16, fp16"),
    ("data.eval_fraction=1.5", "data.eval_fraction must be in [0, 1), got 1.5"),
])
def test_bad_values_fail_with_the_key(override, message):
    cfg = compose_with(override)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert message in str(info.value)


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(True, False, ("bfloat16", "AMX")),
                                                       (False, True, ("bfloat16", "AVX512-BF16")),
                                                       (False, False, ("float32", "neither"))])
def test_auto_compute_dtype_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, amx, avx512_bf16, expected):
    import torch

    from qlora.train.recipes import native_compute_dtype, quant_config, resolve_compute_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    dtype, why = native_compute_dtype("cpu")
    assert dtype == expected[0] and expected[1] in why
    cfg = compose_with()  # the embedded default asks for auto
    assert cfg.quantization.compute_dtype == "auto"
    if not torch.cuda.is_available():
        assert quant_config(cfg.quantization).compute_dtype == getattr(torch, dtype)
    note = resolve_compute_dtype(cfg, "cpu")
    assert cfg.quantization.compute_dtype == dtype and note == f"quantization.compute_dtype=auto: {dtype} ({why})"
    assert resolve_compute_dtype(cfg, "cpu") is None  # a named dtype is left alone


def test_auto_compute_dtype_on_a_gpu_without_bf16_is_fp32(monkeypatch):
    import torch

    from qlora.train.recipes import native_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert native_compute_dtype("cuda:0") == ("float32", "this GPU has no native bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation or True)
    assert native_compute_dtype("cuda") == ("bfloat16", "this GPU computes bf16 natively")
