"""qlora.export: merging adapters into the base training saw (or the original), and the export formats."""
import json
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

import qlora
from qlora.export import AdapterMismatchError, export_merged
from qlora.export import merge as merge_module
from qlora.lora import attach_lora, load_lora
from qlora.models.checkpoint import ShardReader
from tiny_models import COMMON, save_tiny
from tiny_run import save_tiny_model_with_tokenizer

TOKENS = torch.tensor([[1, 5, 9, 33, 70, 101, 4, 12, 8, 64], [1, 127, 3, 45, 46, 47, 90, 2, 0, 17]])


def make_run(run_dir: Path, model_dir: Path, *, use_dora=False, use_rslora=False, compute_dtype="float32",
             steps=3) -> Path:
    """A run dir as qlora.train.runner leaves it (config.yaml + adapter/), from a few optimizer steps.

    init_lora_weights=False starts B non-zero and the steps move A and B (and DoRA's magnitude), so the
    merge is far from trivial.
    """
    quant = {"quant_type": "nf4", "double_quant": True, "compute_dtype": compute_dtype, "blocksize": 64,
             "quant_storage": "uint8", "skip_modules": ["lm_head"]}
    qconfig = qlora.QuantConfig(**quant)
    model = qlora.load_model(model_dir, qconfig, device="cpu", dtype=torch.float32, progress=False)
    torch.manual_seed(0)
    peft_model = attach_lora(model, r=4, lora_alpha=8, use_dora=use_dora, use_rslora=use_rslora,
                             init_lora_weights=False, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = peft_model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    run_dir.mkdir(parents=True)
    peft_model.save_pretrained(run_dir / "adapter")
    config = {"model": {"name_or_path": str(model_dir), "dtype": "float32", "revision": None,
                        "trust_remote_code": False}, "quantization": quant}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def four_bit_with_adapter(run_dir: Path, base_dir: Path, compute_dtype=torch.float32) -> torch.Tensor:
    model = qlora.load_model(base_dir, qlora.QuantConfig(compute_dtype=compute_dtype), device="cpu",
                             dtype=torch.float32, progress=False)
    return logits(load_lora(model, run_dir / "adapter"))


def dense(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def run_dir(base_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "run", base_dir)


def test_hf_dequantized_equals_4bit_model_with_adapter(run_dir, base_dir, tmp_path):
    expected = four_bit_with_adapter(run_dir, base_dir)
    out = export_merged(run_dir, tmp_path / "f32", dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["qlora_merge"]["base"] == "dequantized" and config["qlora_merge"]["quantization_from"] == "run config.yaml"
    assert "dequant(NF4(W))" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    torch.testing.assert_close(logits(dense(out)), expected, rtol=0, atol=1e-5)

    # The default bf16 output: the same function up to bf16 rounding of the weights.
    out16 = export_merged(run_dir, tmp_path / "bf16", progress=False)
    model16 = AutoModelForCausalLM.from_pretrained(out16)
    assert model16.dtype == torch.bfloat16
    bf16_error = (logits(model16.float()) - expected).abs().max()
    assert bf16_error < 2e-2 * expected.abs().max()
    # ... and it is the dequantized base that makes it so: the original-base merge is much further off.
    original = export_merged(run_dir, tmp_path / "orig", base="original", dtype="float32", progress=False)
    assert (logits(dense(original)) - expected).abs().max() > 5 * bf16_error


def test_hf_original_equals_peft_merge_on_dense_base(run_dir, base_dir, tmp_path):
    out = export_merged(run_dir, tmp_path / "out", base="original", dtype="float32", progress=False)
    assert json.loads((out / "config.json").read_text())["qlora_merge"]["base"] == "original"
    assert "original 16-bit weights" in (out / "README.md").read_text()
    peft_merged = PeftModel.from_pretrained(dense(base_dir), run_dir / "adapter").merge_and_unload()
    torch.testing.assert_close(logits(dense(out)), logits(peft_merged), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", [{"use_rslora": True}, {"use_dora": True}, {"use_dora": True, "use_rslora": True}])
def test_rslora_and_dora_merge(variant, base_dir, tmp_path):
    run = make_run(tmp_path / "run", base_dir, **variant)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert all(config[k] == v for k, v in variant.items())
    out = export_merged(run, tmp_path / "out", dtype="float32", progress=False)
    torch.testing.assert_close(logits(dense(out)), four_bit_with_adapter(run, base_dir), rtol=0, atol=1e-5)
    # Against PEFT's own merge on the dense base too (base="original"): PEFT's math, not a copy of it.
    out_original = export_merged(run, tmp_path / "orig", base="original", dtype="float32", progress=False)
    peft_merged = PeftModel.from_pretrained(dense(base_dir), run / "adapter").merge_and_unload()
    torch.testing.assert_close(logits(dense(out_original)), logits(peft_merged), rtol=0, atol=1e-5)


def test_prequantized_base(run_dir, base_dir, tmp_path):
    """A base saved in 4 bits is decoded from its packed tensors; base=original then needs original=."""
    four_bit = tmp_path / "base4"
    qlora.save_model(qlora.load_model(base_dir, qlora.QuantConfig(compute_dtype=torch.float32), device="cpu",
                                      dtype=torch.float32, progress=False), four_bit)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(four_bit)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "adapter").symlink_to(run_dir / "adapter")
    out = export_merged(run, tmp_path / "out", dtype="float32", progress=False)
    assert json.loads((out / "config.json").read_text())["qlora_merge"]["quantization_from"] == "base checkpoint"
    torch.testing.assert_close(logits(dense(out)), four_bit_with_adapter(run_dir, base_dir), rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="pre-quantized.*original=<path"):
        export_merged(run, tmp_path / "orig", base="original", progress=False)
    assert not (tmp_path / "orig").exists()
    out = export_merged(run, tmp_path / "orig", base="original", original=base_dir, dtype="float32", progress=False)
    peft_merged = PeftModel.from_pretrained(dense(base_dir), run_dir / "adapter").merge_and_unload()
    torch.testing.assert_close(logits(dense(out)), logits(peft_merged), rtol=0, atol=1e-5)


def test_nf4_export_loads_and_reports_error(run_dir, base_dir, tmp_path):
    out = export_merged(run_dir, tmp_path / "nf4", format="nf4", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    error = config["qlora_merge"]["nf4_added_logit_error"]
    assert 0 < error["max_abs"] < float("inf") and 0 < error["mean_abs"] <= error["max_abs"]
    assert "re-quantized" in (out / "README.md").read_text()
    model = qlora.load_model(out, qlora.QuantConfig(compute_dtype=torch.float32), device="cpu", progress=False)
    assert any(isinstance(m, qlora.Linear4bit) for m in model.modules())
    expected = four_bit_with_adapter(run_dir, base_dir)
    assert (logits(model) - expected).abs().max() < 10 * error["max_abs"]

    pytest.importorskip("bitsandbytes")
    bnb_model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    torch.testing.assert_close(logits(bnb_model), logits(model), rtol=0, atol=5e-2)


class _SpyReader(ShardReader):
    """Records every tensor read, to check that the merge never holds two base tensors at once."""

    max_alive = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.returned: list[weakref.ref] = []

    def get(self, key):
        alive = sum(ref() is not None for ref in self.returned)
        _SpyReader.max_alive = max(_SpyReader.max_alive, alive)
        tensor = super().get(key)
        self.returned.append(weakref.ref(tensor))
        return tensor


def test_merge_streams_one_tensor_at_a_time(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_module, "ShardReader", _SpyReader)  # qlora's own reader, not a library
    limit = 40_000
    out = export_merged(run_dir, tmp_path / "out", dtype="bfloat16", max_shard_size=limit, progress=False)
    # Every base tensor is dropped before the next is read (the output is bf16 of an fp32 base: a copy).
    assert _SpyReader.max_alive == 0
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    largest = max(p.numel() * 2 for p in dense(out).parameters())
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    peak = json.loads((out / "config.json").read_text())["qlora_merge"]["peak_shard_bytes"]
    assert peak <= max(limit, largest)
    assert not list(tmp_path.glob(".*")), "no staging directory is left behind"


def test_errors_are_clear_and_leave_nothing(run_dir, base_dir, tmp_path):
    no_adapter = tmp_path / "run-without-adapter"
    no_adapter.mkdir()
    (no_adapter / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="run-without-adapter: no adapter there"):
        export_merged(no_adapter, tmp_path / "a", progress=False)

    other = save_tiny("gpt_neox", tmp_path / "neox")  # other module names
    narrow = tmp_path / "narrow"  # same names, other shapes
    AutoModelForCausalLM.from_config(LlamaConfig(num_key_value_heads=2, **{**COMMON, "intermediate_size": 128})) \
        .save_pretrained(narrow)
    for wrong_base, message in ((other, "not a linear layer of the base"), (narrow, "has a \\[.*\\] weight there")):
        run = tmp_path / f"run-{wrong_base.name}"
        run.mkdir()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["model"]["name_or_path"] = str(wrong_base)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "adapter").symlink_to(run_dir / "adapter")
        with pytest.raises(AdapterMismatchError, match=message):
            export_merged(run, tmp_path / "b", progress=False)

    with pytest.raises(ValueError, match="format='onnx'"):
        export_merged(run_dir, tmp_path / "c", format="onnx", progress=False)
    with pytest.raises(ValueError, match="base='fp8'"):
        export_merged(run_dir, tmp_path / "c", base="fp8", progress=False)

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        export_merged(run_dir, full, progress=False)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    export_merged(run_dir, full, overwrite=True, progress=False)
    assert not (full / "keep.txt").exists() and (full / "model.safetensors").is_file()

    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "partial output left behind"
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))
