"""`qlora quantize`: GPTQ on the embedded model from a local calibration file, with progress, into
a checkpoint qlora.load_model reads back; bad options fail in one line."""
import json
from pathlib import Path

import pytest
import torch

import qlora
from qlora.cli import main


def tiny_with_tokenizer(directory):
    """A 2-layer Llama with the embedded model's tokenizer (vocabulary 4096): a real tokenizer, tiny weights."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora.embedded import BASE_MODEL_DIR

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(BASE_MODEL_DIR / name, directory / name)
    return directory


def test_quantize_command_writes_a_gptq_checkpoint(tmp_path, capsys):
    dense = tiny_with_tokenizer(tmp_path / "dense")
    calibration = tmp_path / "calib.txt"
    calibration.write_text("\n\n".join(["The with statement wraps a block with methods of a context manager."] * 20))
    code = main(["quantize", f"model={dense}", "method=gptq", "bits=4", "group_size=32", f"dataset={calibration}",
                 f"output_dir={tmp_path / 'gptq'}", "model_seqlen=64", "samples=2", "device=cpu", "progress=true"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "GPTQ" in captured.err and "err=" in captured.err  # the progress bar names each layer's error
    assert "wrote" in captured.out and "GPTQ 4-bit, group_size 32" in captured.out
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 4, 32)
    model = qlora.load_model(tmp_path / "gptq", device="cpu", progress=False,
                             quantization_config=qlora.GPTQQuantConfig(compute_dtype=torch.float32))
    assert sum(isinstance(m, qlora.LinearGPTQ) for m in model.modules()) == 2 * 7
    assert (tmp_path / "gptq" / "tokenizer.json").is_file()


def test_quantize_command_rejects_bad_options(tmp_path, capsys):
    assert main(["quantize", "model=embedded", "method=awq", "dataset=embedded", f"out={tmp_path}"]) == 2
    assert "method='awq' is not supported; methods: gptq" in capsys.readouterr().err
    assert main(["quantize", "model=embedded", "bits=5", "dataset=embedded", f"out={tmp_path}"]) == 1
    assert "GPTQ bits must be one of [2, 3, 4, 8], got 5" in capsys.readouterr().err
    assert main(["quantize", "model=embedded", "bits=4", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err  # out= is the former name of output_dir=: accepted, with a warning
    assert "dataset" in err and "out= is deprecated; use output_dir=" in err


def test_gptq_recipes_compose_and_the_cache_is_keyed_by_the_options(tmp_path):
    from hydra import compose, initialize_config_dir

    from qlora.models.gptq_base import cache_path, gptq_base, gptq_options
    from qlora.train.schema import register
    from qlora.train.recipe_checks import validate

    register()
    recipes = str(Path(__file__).resolve().parents[1] / "recipes")
    with initialize_config_dir(config_dir=recipes, version_base="1.3"):
        preset = compose(config_name="config", overrides=["recipe=llama7b_gptq4"])
        embedded = compose(config_name="config", overrides=["quantization=gptq4"])
    validate(preset)
    assert preset.quantization.method == "gptq" and preset.quantization.gptq.dataset == "wikitext2"
    assert (preset.lora.r, preset.trainer.run_name) == (64, "llama7b_gptq4")
    assert embedded.quantization.gptq.bits == 4 and embedded.quantization.gptq.dataset == "embedded"
    options = gptq_options({"cache_dir": str(tmp_path)})
    assert cache_path("m", options) != cache_path("m", {**options, "bits": 3})
    with pytest.raises(ValueError, match=r"quantization.gptq has unknown keys \['bitz'\]"):
        gptq_options({"bitz": 4})
    with pytest.raises(FileNotFoundError, match="cached at .* no longer exists"):
        gptq_base(str(tiny_with_tokenizer(tmp_path / "dense")), options, create=False)
