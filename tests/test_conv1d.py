"""GPT-2's Conv1D layers: quantized as transformers + bitsandbytes quantizes them (the same bytes, both
ways), LoRA on them loads in stock PEFT on the 16-bit model, and the export writes them back as Conv1D."""
import json

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

import qlora
from qlora.export import export_merged
from qlora.lora import attach_lora, load_lora
from qlora.nn import QuantizedLinear
from helpers import rel_err, requires_bnb
from model_families import FAMILIES, VOCAB
from test_model_families import save_family, simulate_quantization

GPT2 = next(f for f in FAMILIES if f.name == "gpt2")
TOKENS = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_family(GPT2, tmp_path_factory.mktemp("gpt2") / "model")


def dense(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_conv1d_layers_are_quantized_as_out_by_in(gpt2_dir):
    model = qlora.load_model(gpt2_dir, qlora.QuantConfig(compute_dtype=torch.float32), device="cpu",
                             dtype=torch.float32, progress=False)
    source = dense(gpt2_dir).transformer.h[0].attn.c_attn
    assert isinstance(source, Conv1D) and tuple(source.weight.shape) == (64, 192)  # [in, out]
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QuantizedLinear) and (layer.in_features, layer.out_features) == (64, 192)
    assert layer.quant_state.shape == (192, 64)  # quantized as W.T, as bitsandbytes does
    assert torch.equal(layer.bias, source.bias)


@requires_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_same_bytes_as_transformers_bitsandbytes_both_ways(bits, tmp_path):
    """transformers + bitsandbytes quantizes a Conv1D's W.T: a bnb checkpoint of gpt2 holds the [out, in]
    matrix. Loading the 16-bit gpt2 gives the bytes it gives, key for key; each loads the other's save.
    (fp32 weights: transformers casts to the dtype asked for before quantizing, and the quant_state
    records that dtype.)"""
    gpt2_dir = save_family(GPT2, tmp_path / "gpt2", dtype=torch.float32)
    if bits == 4:
        theirs_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32)
        ours_config = qlora.QuantConfig(compute_dtype=torch.float32)
    else:
        theirs_config = BitsAndBytesConfig(load_in_8bit=True)
        ours_config = qlora.Int8Config(compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(gpt2_dir, quantization_config=theirs_config, dtype=torch.float32,
                                                  device_map="cpu")
    ours = qlora.load_model(gpt2_dir, ours_config, device="cpu", dtype=torch.float32, progress=False)
    their_state = theirs.state_dict()
    ours_state = ours.state_dict()
    assert "transformer.h.0.mlp.c_fc.weight" in ours_state
    for key, value in ours_state.items():
        assert torch.equal(value, their_state[key]), key

    theirs.save_pretrained(tmp_path / "theirs")
    reloaded = qlora.load_model(tmp_path / "theirs", device="cpu", dtype=torch.float32, progress=False)
    assert all(torch.equal(v, ours_state[k]) for k, v in reloaded.state_dict().items())
    saved = qlora.save_model(ours, tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, device_map="cpu").state_dict()
    assert all(torch.equal(back[k], v) for k, v in ours_state.items())


def make_run(run_dir, model_dir):
    """A run dir as qlora.train.runner leaves it (config.yaml + adapter/): a few steps of LoRA on every
    Conv1D, B starting non-zero so that the merge is far from trivial."""
    quant = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32", "blocksize": 64,
             "quant_storage": "uint8", "skip_modules": ["lm_head"]}
    model = qlora.load_model(model_dir, qlora.QuantConfig(**quant), device="cpu", dtype=torch.float32, progress=False)
    torch.manual_seed(0)
    peft_model = attach_lora(model, r=4, lora_alpha=8, init_lora_weights=False, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(run_dir / "adapter")
    config = {"model": {"name_or_path": str(model_dir), "dtype": "float32", "revision": None,
                        "trust_remote_code": False}, "quantization": quant}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir, logits(peft_model)


@pytest.mark.slow
def test_lora_on_conv1d_loads_in_peft_and_exports(gpt2_dir, tmp_path):
    run_dir, trained = make_run(tmp_path / "run", gpt2_dir)
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert {"c_attn", "c_proj", "c_fc"} <= set(adapter["target_modules"])
    # Stock PEFT on the 16-bit gpt2 (its Conv1D, fan_in_fan_out) carrying dequant(quant(W)): the same function.
    base = dense(gpt2_dir)
    simulate_quantization(base, [n for n, m in base.named_modules() if isinstance(m, Conv1D)])
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft_model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert rel_err(logits(peft_model), trained) < 1e-5
    reloaded = load_lora(qlora.load_model(gpt2_dir, qlora.QuantConfig(compute_dtype=torch.float32), device="cpu",
                                          dtype=torch.float32, progress=False), run_dir / "adapter")
    assert rel_err(logits(reloaded), trained) < 1e-5

    # The export merges into dequant(NF4(W)) and writes each Conv1D back as [in, out]; and into W itself.
    merged = dense(export_merged(run_dir, tmp_path / "merged", dtype="float32", progress=False))
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    assert rel_err(logits(merged), trained) < 1e-5
    original = dense(export_merged(run_dir, tmp_path / "original", base="original", dtype="float32", progress=False))
    peft_merged = PeftModel.from_pretrained(dense(gpt2_dir), run_dir / "adapter").merge_and_unload()
    assert rel_err(logits(original), logits(peft_merged)) < 1e-5


def test_loftq_reads_conv1d_weights_in_their_layout(gpt2_dir):
    from qlora.loftq import checkpoint_weights, decompose, loftq_model, quantize_roundtrip

    model = qlora.load_model(gpt2_dir, qlora.QuantConfig(compute_dtype=torch.float32), device="cpu",
                             dtype=torch.float32, progress=False)
    name = "transformer.h.1.mlp.c_proj"
    with checkpoint_weights(str(gpt2_dir)) as weight:
        result = loftq_model(model, weight, rank=2, iterations=1, target_modules=[name])
        stored = weight(name)
    assert tuple(stored.shape) == (128, 64)  # the checkpoint's Conv1D [in, out]; the layer is [out=64, in=128]
    layer = model.get_submodule(name)
    expected = decompose(stored.t().float(), 2, 1, lambda t: quantize_roundtrip(layer, t))
    assert torch.equal(layer.dequantize(torch.float32), expected.dequantized)
    assert result.report["layers"] == 1 and result.report["relative_error_loftq"][-1] < result.report["relative_error_plain"]
