"""8-bit checkpoints both ways with transformers + bitsandbytes, the memory footprint, and LoRA on
an 8-bit base."""
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora
from qlora.lora import attach_lora
from helpers import rel_err, requires_bnb
from tiny_models import save_tiny

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
FP32 = qlora.Int8Config(compute_dtype=torch.float32)


def _transformers_8bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if "load_in_8bit" in (path / "config.json").read_text():
        # Pre-quantized: no dtype argument, which would cast the int8 codes to it (transformers 5.23).
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                device_map="cpu", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("int8") / "dense", dtype=torch.float32)


@requires_bnb
@torch.no_grad()
def test_dense_checkpoint_quantizes_to_the_bytes_transformers_bitsandbytes_makes(dense_dir, tmp_path):
    reference = _transformers_8bit(dense_dir)
    model = qlora.load_model(dense_dir, FP32, device="cpu", progress=False)
    ours, theirs = model.state_dict(), reference.state_dict()
    quantized = [k for k in theirs if k.endswith(".SCB")]
    assert len(quantized) == 14  # 7 linears x 2 layers; lm_head stays dense
    for key in quantized:
        prefix = key[: -len("SCB")]
        assert torch.equal(ours[prefix + "weight"], theirs[prefix + "weight"]), prefix
        assert torch.equal(ours[key], theirs[key]), key
    # The same model in the same fp32 compute: logits within the activation rounding of fp16 vs fp32
    # inputs (bitsandbytes casts activations to fp16 before quantizing them; ~1/254 of a row's range).
    assert rel_err(model(TOKENS).logits, reference(TOKENS).logits) < 2e-2
    # memory_footprint counts what get_memory_footprint counts, plus the SCB scales it cannot see.
    scb_bytes = sum(theirs[k].numel() * 4 for k in quantized)
    assert qlora.memory_footprint(model, quant_state=False) == reference.get_memory_footprint()
    assert qlora.memory_footprint(model) == reference.get_memory_footprint() + scb_bytes


@requires_bnb
@torch.no_grad()
def test_transformers_checkpoint_loads_and_ours_loads_in_transformers(dense_dir, tmp_path):
    reference = _transformers_8bit(dense_dir)
    reference.save_pretrained(tmp_path / "bnb8")
    model = qlora.load_model(tmp_path / "bnb8", FP32, device="cpu", progress=False)
    assert isinstance(model.model.layers[1].self_attn.o_proj, qlora.Linear8bit)
    expected = reference(TOKENS).logits
    assert rel_err(model(TOKENS).logits, expected) < 2e-2
    qlora.save_model(model, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    written = load_file(tmp_path / "bnb8" / "model.safetensors")
    assert set(saved) == set(written)
    assert all(torch.equal(saved[k], written[k]) for k in saved)
    again = _transformers_8bit(tmp_path / "ours")
    assert torch.equal(again(TOKENS).logits, expected)  # the same bytes: the same logits, bit for bit


def test_checkpoint_with_garbled_scb_names_the_tensor(dense_dir, tmp_path):
    model = qlora.load_model(dense_dir, FP32, device="cpu", progress=False)
    qlora.save_model(model, tmp_path / "q8")
    tensors = load_file(tmp_path / "q8" / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.SCB"] = tensors["model.layers.0.mlp.up_proj.SCB"][:5]
    save_file(tensors, tmp_path / "q8" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight: SCB must be float \[192\]"):
        qlora.load_model(tmp_path / "q8", FP32, device="cpu", progress=False)
    del tensors["model.layers.0.mlp.up_proj.SCB"]
    save_file(tensors, tmp_path / "q8" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj.weight: the checkpoint has the int8 weight but no SCB"):
        qlora.load_model(tmp_path / "q8", FP32, device="cpu", progress=False)


def test_threshold_and_skip_modules_reach_the_layers(dense_dir):
    cfg = qlora.Int8Config(threshold=2.5, skip_modules=["lm_head", "down_proj"], compute_dtype=torch.float32)
    model = qlora.load_model(dense_dir, cfg, device="cpu", progress=False)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, torch.nn.Linear) and not isinstance(layer.mlp.down_proj, qlora.Linear8bit)
    assert layer.self_attn.q_proj.threshold == 2.5 and layer.self_attn.q_proj.quantized_weight.threshold == 2.5
    assert model.config.quantization_config["llm_int8_threshold"] == 2.5


def test_lora_trains_on_the_8bit_base_and_saves_a_plain_peft_adapter(dense_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = qlora.load_model(dense_dir, FP32, device="cpu", progress=False)
    peft_model = attach_lora(model, r=4, target_modules=["q_proj", "v_proj", "down_proj"], gradient_checkpointing=False)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[n], p) for n, p in peft_model.named_parameters() if n in frozen)
    peft_model.save_pretrained(tmp_path / "adapter")
    # A plain PEFT adapter: it loads on the dense base in transformers.
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(dense, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(reloaded(TOKENS).logits, peft_model(TOKENS).logits) < 3e-2


@torch.no_grad()
def test_a_prequantized_checkpoint_computes_in_its_own_dtype_unless_told_otherwise(dense_dir, tmp_path):
    # transformers computes an 8-bit checkpoint in the dtype it was saved in (its config has no compute
    # dtype); an fp16 checkpoint computed in bf16 sits further from bitsandbytes' own logits than its
    # two modes sit from each other.
    saved = qlora.save_model(qlora.load_model(dense_dir, qlora.Int8Config(compute_dtype=torch.float16),
                                              device="cpu", dtype=torch.float16, progress=False), tmp_path / "fp16")
    layers = [m for m in qlora.load_model(saved, device="cpu", progress=False).modules()
              if isinstance(m, qlora.QuantizedLinear)]
    assert layers and {layer.compute_dtype for layer in layers} == {torch.float16}
    told = qlora.load_model(saved, qlora.Int8Config(compute_dtype=torch.float32), device="cpu", progress=False)
    assert {m.compute_dtype for m in told.modules() if isinstance(m, qlora.QuantizedLinear)} == {torch.float32}


def test_the_load_bar_names_the_format_it_loads(dense_dir, capsys):
    qlora.load_model(dense_dir, FP32, device="cpu", progress=True)
    assert "loading (int8)" in capsys.readouterr().err
    qlora.load_model(dense_dir, qlora.QuantConfig(quant_type="fp4", compute_dtype=torch.float32), device="cpu")
    assert "loading (fp4)" in capsys.readouterr().err
