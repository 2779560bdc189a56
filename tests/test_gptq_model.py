"""GPTQ as an algorithm and over a model: the solver against round-to-nearest, the Hessian,
dampening, calibration data, load_model quantizing block by block, save/load both ways, LoRA/DoRA
on the GPTQ layers, and the export merge into dequant(GPTQ W)."""
import json
import logging

import pytest
import torch

import qlora
from qlora.models.gptq_calibration import calibration_samples, calibration_texts
from qlora.quant.gptq.solver import HessianAccumulator, NotPositiveDefiniteError, gptq_quantize, quantization_error
from helpers import rel_err
from tiny_models import VOCAB, save_tiny

TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. " * 6).split(". ")


class CharTokenizer:
    """Characters to ids below the tiny models' vocabulary: enough for calibration."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % (VOCAB - 2) for c in text]}


def correlated_inputs(rows=512, features=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    return torch.randn(rows, features, generator=generator) @ mixing * torch.linspace(0.2, 2.0, features)


def test_hessian_is_two_x_xt_over_rows_in_any_chunking():
    x = correlated_inputs()
    acc = HessianAccumulator(128, "cpu")
    for chunk in (x[:100], x[100:101], x[101:]):
        acc.add(chunk.unsqueeze(0))
    expected = 2 * x.double().T @ x.double() / x.shape[0]
    assert rel_err(acc.hessian, expected) < 1e-6 * 128**0.5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act, static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, desc_act, static_groups):
    x = correlated_inputs()
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(48, 128)
    result = gptq_quantize(w, hessian, bits=bits, group_size=32, desc_act=desc_act, static_groups=static_groups)
    assert torch.equal(result.weight.dequantize(torch.float32), result.dequantized)  # packed = what was propagated
    gptq_error = quantization_error(w, result.dequantized, hessian)
    rtn = qlora.GPTQWeight.quantize(w, bits=bits, group_size=32).dequantize(torch.float32)
    assert gptq_error < 0.8 * quantization_error(w, rtn, hessian)
    g_idx = result.weight.checkpoint_tensors()["g_idx"]
    if desc_act and not static_groups:
        assert not bool((g_idx[1:] >= g_idx[:-1]).all())  # act-order groups
    else:
        assert torch.equal(g_idx, torch.arange(128, dtype=torch.int32) // 32)


def test_dead_inputs_are_zeroed_and_a_non_pd_hessian_is_retried_with_more_damping(caplog):
    x = correlated_inputs(features=64)
    x[:, 5] = 0
    hessian = 2 * x.T @ x / x.shape[0]
    result = gptq_quantize(torch.randn(16, 64), hessian, group_size=-1)
    assert torch.all(result.dequantized[:, 5] == 0)
    indefinite = hessian.clone()
    indefinite[7, 7] = -hessian.diagonal().mean() * 0.5  # no damping of 0.1 x mean(diag) makes this PD
    with caplog.at_level(logging.WARNING):
        result = gptq_quantize(torch.randn(16, 64), indefinite, damp_percent=0.01, where="model.layers.3.mlp.up_proj")
    assert result.damp_percent > 0.01
    assert "model.layers.3.mlp.up_proj: GPTQ Hessian not positive definite with damp_percent=0.01" in caplog.text
    hopeless = -torch.eye(64)
    with pytest.raises(NotPositiveDefiniteError, match="layers.0.q_proj: the GPTQ Hessian is not positive definite even"):
        gptq_quantize(torch.randn(16, 64), hopeless, where="layers.0.q_proj")


def test_calibration_data_lists_files_and_a_hub_name_offline(tmp_path, monkeypatch):
    assert calibration_texts(["a", "b"]) == ["a", "b"]
    (tmp_path / "calib.jsonl").write_text(json.dumps({"text": "first"}) + "\n" + json.dumps("second") + "\n")
    assert calibration_texts(str(tmp_path / "calib.jsonl")) == ["first", "second"]
    (tmp_path / "calib.txt").write_text("one paragraph\n\nanother one\n")
    assert calibration_texts(tmp_path / "calib.txt") == ["one paragraph", "another one\n"]
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        calibration_texts(None)
    with pytest.raises(ValueError, match=r"calibration dataset \(list of 0\) is empty"):
        calibration_texts([])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="'wikitext2' is a Hub dataset but the Hub is offline"):
        calibration_texts("wikitext2")
    samples = calibration_samples(["abcdef", "ghij"], CharTokenizer(), seqlen=4, max_samples=8)
    # 6 + EOS + 4 + EOS = 12 tokens: three samples of 4, the texts joined by EOS (id 1)
    assert [s.tolist() for s in samples] == [[[99, 100, 101, 102]], [[103, 104, 1, 105]], [[106, 107, 108, 1]]]
    assert len(calibration_samples(["abcdef", "ghij"], CharTokenizer(), seqlen=4, max_samples=2)) == 2
    with pytest.raises(ValueError, match="calibration text has 5 tokens, fewer than model_seqlen=16"):
        calibration_samples(["abcd"], CharTokenizer(), seqlen=16, max_samples=8)


class TwoStepBlock(torch.nn.Module):
    """Each linear reads a temporary that is freed as soon as the linear returns."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.second(self.first(x * 2) + 1)


def test_true_sequential_groups_the_sublayers_by_the_input_they_share():
    from qlora.models.gptq_calibration import _linear_groups, capture_block_inputs
    from tiny_models import build_model

    model = build_model("llama")
    inputs = capture_block_inputs(model, model.model.layers, [torch.randint(0, VOCAB, (1, 32))], "cpu")
    assert _linear_groups(model.model.layers[0], inputs[0], lambda name: True) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    # `x * 2` is freed when `first` returns and `... + 1` may take its id(): grouping by the ids of
    # freed tensors put unrelated layers (o_proj with gate/up) together now and then.
    for _ in range(20):
        assert _linear_groups(TwoStepBlock(), (torch.randn(3, 8), {}), lambda name: True) == [["first"], ["second"]]


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory):
    """A tiny Llama quantized with act-order GPTQ, saved; plus the dense original."""
    root = tmp_path_factory.mktemp("gptq")
    dense_dir = save_tiny("llama", root / "dense", dtype=torch.float32)
    config = qlora.GPTQQuantConfig(bits=4, group_size=32, desc_act=True, dataset=TEXT, tokenizer=CharTokenizer(),
                                   model_seqlen=32, compute_dtype=torch.float32)
    model = qlora.load_model(dense_dir, quantization_config=config, device="cpu", progress=False)
    qlora.save_model(model, root / "gptq")
    return dense_dir, root / "gptq", model


def test_load_model_quantizes_with_calibration_and_saves_a_v1_checkpoint(gptq_checkpoint):
    from transformers import AutoModelForCausalLM

    dense_dir, gptq_dir, model = gptq_checkpoint
    layers = [m for m in model.modules() if isinstance(m, qlora.LinearGPTQ)]
    assert len(layers) == 2 * 7 and model.lm_head.__class__ is torch.nn.Linear
    ids = torch.tensor([CharTokenizer()(". ".join(TEXT))["input_ids"][:64]])  # text like the calibration's
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    rtn = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in rtn.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(qlora.GPTQWeight.quantize(module.weight, bits=4, group_size=32).dequantize(torch.float32))
        got, expected, rounded = model(ids).logits, dense(ids).logits, rtn(ids).logits
    assert rel_err(got, expected) < 0.8 * rel_err(rounded, expected)
    config = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["desc_act"] is True
    assert config["checkpoint_format"] == "gptq"
    assert json.loads((gptq_dir / "quantize_config.json").read_text())["group_size"] == 32
    from safetensors import safe_open

    with safe_open(str(gptq_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        g_idx = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
    assert {"model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.qzeros",
            "model.layers.0.self_attn.q_proj.scales", "model.layers.0.self_attn.q_proj.g_idx"} <= keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert not bool((g_idx[1:] >= g_idx[:-1]).all())  # act-order saved in the checkpoint's order


def test_a_gptq_checkpoint_loads_the_same_model_both_config_forms(gptq_checkpoint, tmp_path):
    _, gptq_dir, model = gptq_checkpoint
    ids = torch.randint(0, VOCAB, (1, 20))
    fp32 = qlora.GPTQQuantConfig(compute_dtype=torch.float32)
    loaded = qlora.load_model(gptq_dir, quantization_config=fp32, device="cpu", progress=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # An AutoGPTQ-era checkpoint: the layout only in quantize_config.json.
    import shutil

    old = tmp_path / "old"
    shutil.copytree(gptq_dir, old)
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]
    (old / "config.json").write_text(json.dumps(config))
    loaded = qlora.load_model(old, quantization_config=fp32, device="cpu", progress=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_and_dora_train_on_gptq_layers(gptq_checkpoint, use_dora):
    from qlora.lora import attach_lora

    _, gptq_dir, _ = gptq_checkpoint
    model = qlora.load_model(gptq_dir, quantization_config=qlora.GPTQQuantConfig(compute_dtype=torch.float32),
                             device="cpu", progress=False)
    peft_model = attach_lora(model, r=4, use_dora=use_dora, gradient_checkpointing=False)
    ids = torch.randint(0, VOCAB, (2, 16))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and all(torch.isfinite(g).all() for g in grads.values())
    assert any("lora_magnitude" in n for n in grads) == use_dora


def test_export_merges_into_the_dequantized_gptq_weights(gptq_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora.export import export_merged, read_merge_record
    from qlora.lora import attach_lora

    _, gptq_dir, _ = gptq_checkpoint
    model = qlora.load_model(gptq_dir, quantization_config=qlora.GPTQQuantConfig(compute_dtype=torch.float32),
                             device="cpu", progress=False)
    peft_model = attach_lora(model, r=4, gradient_checkpointing=False, init_lora_weights=False)  # B != 0
    peft_model.save_pretrained(tmp_path / "adapter")
    # The adapter names its base (base_model_name_or_path): the GPTQ checkpoint, merged from its packed tensors.
    export_merged(tmp_path / "adapter", tmp_path / "merged", base="dequantized", dtype="float32", progress=False)
    record = read_merge_record(tmp_path / "merged")
    assert record["base_prequantized"] and record["quantization"]["format"] == "gptq"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert rel_err(merged(ids).logits, peft_model(input_ids=ids).logits) < 1e-5


def test_the_logged_figures_are_output_errors_and_round_to_nearest_is_the_formats_own():
    from qlora.models.gptq_calibration import output_error, round_to_nearest_error

    x = correlated_inputs()
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(48, 128)
    for sym in (True, False):
        config = qlora.GPTQQuantConfig(bits=4, group_size=32, sym=sym)
        rtn = qlora.GPTQWeight.quantize(w, bits=4, group_size=32, sym=sym).dequantize(torch.float32)
        assert round_to_nearest_error(w, hessian, config) == pytest.approx(output_error(w - rtn, hessian), rel=1e-5)
    result = gptq_quantize(w, hessian, bits=4, group_size=32)
    # GPTQ's accumulated loss is the output error it causes on the damped Hessian it inverts.
    damped = hessian + result.damp_percent * hessian.diagonal().mean() * torch.eye(128)
    assert result.loss == pytest.approx(output_error(w - result.dequantized, damped), rel=0.02)
