"""Loading and saving whole models: families, bitsandbytes interop, memory accounting, errors."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import qlora
from qlora.nn import Linear4bit
from helpers import rel_err, requires_bnb
from tiny_models import FAMILIES, VOCAB, build_model, save_tiny

FP32 = qlora.QuantConfig(compute_dtype=torch.float32)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 13))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_load_quantized(family, tmp_path, ids):
    path = save_tiny(family, tmp_path / family, dtype=torch.float32)
    model = qlora.load_model(path, FP32, device="cpu", progress=False)
    layers = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(n.endswith(("lm_head", "embed_out")) for n in linears), linears
    # Equal to the dense model that carries the dequantized weights (same math, fp32).
    dense = build_model(family)
    for name in layers:
        module = model.get_submodule(name)
        dense.get_submodule(name).weight.data = module.dequantize(torch.float32)
    assert rel_err(logits(model, ids), logits(dense, ids)) < 1e-5
    # And close to the original dense model: NF4 error only.
    assert rel_err(logits(model, ids), logits(build_model(family), ids)) < 0.2


def test_tied_head_stays_dense_and_tied(tmp_path):
    path = save_tiny("gemma", tmp_path / "g", dtype=torch.float32)
    model = qlora.load_model(path, FP32, device="cpu", progress=False)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_save_reload_round_trip(tmp_path, ids):
    path = save_tiny("llama", tmp_path / "src")
    model = qlora.load_model(path, FP32, device="cpu", progress=False)
    out = qlora.save_model(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    again = qlora.load_model(out, FP32, device="cpu", progress=False)
    assert torch.equal(logits(again, ids), logits(model, ids))
    for (k1, v1), (k2, v2) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_sharded_save_and_storage_dtype(tmp_path, ids):
    path = save_tiny("qwen2", tmp_path / "src")
    config = qlora.QuantConfig(compute_dtype=torch.float32, quant_storage=torch.bfloat16, quant_type="fp4",
                               double_quant=False)
    model = qlora.load_model(path, config, device="cpu", progress=False)
    out = qlora.save_model(model, tmp_path / "out", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    again = qlora.load_model(out, FP32, device="cpu", progress=False)
    layer = again.model.layers[0].mlp.up_proj
    assert (layer.quant_type, layer.double_quant, layer.weight.dtype) == ("fp4", False, torch.bfloat16)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_bits_and_bytes_config_is_accepted(tmp_path):
    path = save_tiny("llama", tmp_path / "src")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head", "o_proj"])
    model = qlora.load_model(path, config, device="cpu", progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    assert isinstance(model.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16


def test_memory_footprint(tmp_path):
    path = save_tiny("llama", tmp_path / "src")
    dense = build_model("llama", dtype=torch.bfloat16)
    model = qlora.load_model(path, device="cpu", progress=False)
    linear_params = sum(m.weight.numel() for m in dense.modules()
                        if isinstance(m, torch.nn.Linear) and m is not dense.lm_head)
    saved = qlora.memory_footprint(dense) - qlora.memory_footprint(model)
    # Each quantized weight goes from 16 bits to ~4.127 (+ per-layer code books).
    assert saved == pytest.approx(linear_params * (16 - 4.127) / 8, rel=0.05)


def test_missing_path_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qlora.load_model(tmp_path / "nowhere", device="cpu")
    path = save_tiny("llama", tmp_path / "src")
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        qlora.load_model(path, device="cpu")


def test_hub_id_uses_the_hub_client(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set and 'someone/some-model-bnb-4bit' is not a local "
                                      "directory.*pass name_or_path=<dir>"):
        qlora.load_model("someone/some-model-bnb-4bit", device="cpu")


def test_shape_mismatch_and_missing_tensor(tmp_path):
    path = save_tiny("llama", tmp_path / "src")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj.weight: checkpoint tensor has shape \[191, 64\], .* expects \[192, 64\]"):
        qlora.load_model(path, device="cpu", progress=False)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the checkpoint has no tensor for model.layers.0.mlp.up_proj.weight"):
        qlora.load_model(path, device="cpu", progress=False)


def test_garbled_prequantized_checkpoint(tmp_path):
    model = qlora.load_model(save_tiny("llama", tmp_path / "src"), device="cpu", progress=False)
    out = qlora.save_model(model, tmp_path / "q")
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    tensors[key] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="q_proj.weight: the entry 'quant_state.bitsandbytes__nf4' is garbled"):
        qlora.load_model(out, device="cpu", progress=False)


def test_save_refuses_non_empty_dir_and_is_atomic(tmp_path, monkeypatch):
    model = qlora.load_model(save_tiny("llama", tmp_path / "src"), device="cpu", progress=False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
        qlora.save_model(model, target)
    assert (target / "keep.txt").read_text() == "precious"

    import qlora.models.saving as saving

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(saving, "_write_config", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        qlora.save_model(model, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging left behind
    assert (target / "keep.txt").read_text() == "precious"
    monkeypatch.undo()
    qlora.save_model(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


# ---- against transformers + bitsandbytes -------------------------------------------------------

def bnb_config(compute_dtype=torch.float32, quant_type="nf4", double_quant=True):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def bnb_dequantized_dense(bnb_model, family):
    """A dense model carrying the weights exactly as bitsandbytes quantized them."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    dense = build_model(family)
    for name, module in bnb_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = copy.copy(module.weight.quant_state)
            state.dtype = torch.float32  # bitsandbytes dequantizes to the weight's original dtype otherwise
            w = bnb_f.dequantize_4bit(module.weight.data, state)
            dense.get_submodule(name).weight.data = w
    dense.load_state_dict({k: v for k, v in bnb_model.state_dict().items()
                           if k in dense.state_dict() and v.dtype.is_floating_point}, strict=False)
    return dense


@requires_bnb
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_same_quantization_and_logits_as_bitsandbytes(family, quant_type, double_quant, tmp_path, ids):
    path = save_tiny(family, tmp_path / family, dtype=torch.float32)
    config = bnb_config(quant_type=quant_type, double_quant=double_quant)
    ours = qlora.load_model(path, config, device="cpu", progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32, device_map="cpu")
    # The serialized 4-bit tensors are identical, key for key.
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, their_state[key]), key
    dense = bnb_dequantized_dense(theirs, family)
    assert rel_err(logits(ours, ids), logits(dense, ids)) < 1e-5
    # bitsandbytes' own CPU matmul rounds through bf16, hence the looser bound.
    assert rel_err(logits(ours, ids), logits(theirs, ids)) < 1e-2


@requires_bnb
def test_transformers_loads_what_we_save(tmp_path, ids):
    ours = qlora.load_model(save_tiny("llama", tmp_path / "src"), FP32, device="cpu", progress=False)
    out = qlora.save_model(ours, tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    import bitsandbytes as bnb

    assert isinstance(theirs.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert rel_err(logits(bnb_dequantized_dense(theirs, "llama"), ids), logits(ours, ids)) < 1e-5


@requires_bnb
def test_we_load_what_transformers_saves(tmp_path, ids):
    path = save_tiny("qwen2", tmp_path / "src", dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(), dtype=torch.float32, device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    ours = qlora.load_model(tmp_path / "bnb", FP32, device="cpu", progress=False)
    assert rel_err(logits(ours, ids), logits(bnb_dequantized_dense(theirs, "qwen2"), ids)) < 1e-5


def test_save_copies_the_source_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = save_tiny("llama", tmp_path / "src")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level)
    tokenizer.save_pretrained(path)
    model = qlora.load_model(path, device="cpu", progress=False)
    out = qlora.save_model(model, tmp_path / "out")
    assert (out / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("t5 t7")["input_ids"] == [5, 7]
