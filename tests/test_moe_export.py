"""qlora export on mixture-of-experts models: expert LoRA merged into dequant(NF4(experts)) in fp32, written in
the Hub's per-expert layout (HF), re-quantized (NF4) and as GGUF (qwen3moe, mixtral)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qlora
from qlora.errors import OptionError
from qlora.export import export_merged
from qlora.lora import attach_lora
from test_moe import simulated_quantization
from tiny_moe import save_tiny_moe

TOKENS = torch.tensor([[1, 5, 9, 33, 70, 101, 4, 12, 8, 64, 3, 99], [2, 127, 3, 45, 46, 47, 90, 2, 0, 17, 18, 19]])
QUANT = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32", "blocksize": 64,
         "quant_storage": "uint8", "skip_modules": ["lm_head"]}


def make_moe_run(run_dir: Path, model_dir: Path, skip_modules=("lm_head",)) -> Path:
    """A run dir as the trainer leaves it (config.yaml + adapter/) with LoRA on attention and on every expert
    stack; init_lora_weights=False starts B non-zero, so every expert's delta is far from 0."""
    quant = {**QUANT, "skip_modules": list(skip_modules)}
    model = qlora.load_model(model_dir, qlora.QuantConfig(compute_dtype=torch.float32, skip_modules=list(skip_modules)),
                             device="cpu", dtype=torch.float32, progress=False)
    torch.manual_seed(0)
    peft_model = attach_lora(model, r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             gradient_checkpointing=False)
    run_dir.mkdir(parents=True)
    peft_model.save_pretrained(run_dir / "adapter")
    config = {"model": {"name_or_path": str(model_dir), "dtype": "float32", "revision": None,
                        "trust_remote_code": False}, "quantization": quant}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def peft_merged(model_dir: Path, run_dir: Path, skip_modules=("lm_head",), simulate=True):
    """PEFT's own merge: the fp32 model whose quantized matrices are dequant(quant(W)) (with simulate), the
    adapter loaded with PeftModel and merged with merge_and_unload; and that base's logits without the adapter."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if simulate:
        quantized = qlora.load_model(model_dir, qlora.QuantConfig(skip_modules=list(skip_modules)), device="cpu",
                                     progress=False)
        reference = simulated_quantization(reference, quantized)
    base_logits = logits(reference)
    return PeftModel.from_pretrained(reference, run_dir / "adapter").merge_and_unload().eval(), base_logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", pytest.param("gpt_oss", marks=pytest.mark.slow),
                                        "llama4_text"])
def moe_run(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = save_tiny_moe(family, root / "base")
    run_dir = make_moe_run(root / "run", model_dir)
    return (family, model_dir, run_dir, *peft_merged(model_dir, run_dir))


def test_hf_export_is_peft_merge_in_the_hub_layout(moe_run, tmp_path):
    family, model_dir, run_dir, reference, base_logits = moe_run
    out = export_merged(run_dir, tmp_path / "fp32", dtype="float32", progress=False)
    record = json.loads((out / "config.json").read_text())["qlora_merge"]
    assert record["merged_expert_stacks"] == 4  # gate_up and down of 2 layers

    # The names and shapes save_pretrained writes (per-expert tensors where the Hub has them).
    reference.save_pretrained(tmp_path / "saved")
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    if family not in ("gpt_oss", "llama4_text"):  # these families' checkpoints hold fused stacks; the others per expert
        assert not any("gate_up_proj" in k for k in ours) and any(".experts.3." in k for k in ours)
    # fp32 merge on both sides; PEFT's einsum and our per-expert product may differ in the last bit:
    # a few fp32 ulps of the largest weight (|w| < 2 here).
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=4 * 2 ** -23 * 2, msg=key)

    # Loaded by transformers itself: the logits of PEFT's merged model, to fp32 rounding (a few ulps of the logits).
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = logits(reference)
    error = (logits(merged) - expected).abs().max().item()
    assert error <= 1e-5 * max(expected.abs().max().item(), 1.0)
    assert error < 1e-3 * (expected - base_logits).abs().max().item()  # the adapter moved the logits far more


def _assert_same_weights(out: Path, reference, directory: Path) -> None:
    reference.save_pretrained(directory)
    ours, theirs = load_file(out / "model.safetensors"), load_file(directory / "model.safetensors")
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=4 * 2 ** -23 * 2, msg=key)


def test_experts_kept_16bit_and_base_original_merge_into_w(tmp_path):
    """skip_modules=[experts] trained the experts' LoRA on the 16-bit stacks, so the merge adds to W there
    (and to dequant(NF4(W)) in attention); base=original merges everything into W."""
    model_dir = save_tiny_moe("qwen3_moe", tmp_path / "base")
    skip = ("lm_head", "experts")
    run_dir = make_moe_run(tmp_path / "run", model_dir, skip_modules=skip)
    out = export_merged(run_dir, tmp_path / "skip", dtype="float32", progress=False)
    _assert_same_weights(out, peft_merged(model_dir, run_dir, skip)[0], tmp_path / "peft_skip")
    out = export_merged(run_dir, tmp_path / "original", base="original", dtype="float32", progress=False)
    assert json.loads((out / "config.json").read_text())["qlora_merge"]["base"] == "original"
    _assert_same_weights(out, peft_merged(model_dir, run_dir, simulate=False)[0], tmp_path / "peft_original")


def test_bf16_export_rounds_the_fp32_merge_once(moe_run, tmp_path):
    family, model_dir, run_dir, reference, _ = moe_run
    out = export_merged(run_dir, tmp_path / "bf16", dtype="bfloat16", progress=False)
    reference.save_pretrained(tmp_path / "saved")
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    for key, tensor in theirs.items():
        assert ours[key].dtype == torch.bfloat16, key
        # One rounding of the fp32 merge to bf16: within half a bf16 ulp (2^-9 relative), plus the fp32 ulps above.
        torch.testing.assert_close(ours[key].float(), tensor, rtol=2 ** -8, atol=1e-6, msg=key)


# ---- GGUF -------------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType


def _gguf_checkpoint(family: str, directory: Path) -> Path:
    from test_gguf import _tokenizer

    save_tiny_moe(family, directory, dtype=torch.float32, vocab_size=320)
    _tokenizer().save_pretrained(directory)
    return directory


def _expected_gguf_tensors(model_dir: Path, family: str) -> dict:
    """The HF weights under llama.cpp's names: per-expert tensors stacked [E, out, in] per layer and
    projection, Mixtral's q/k permuted as for the llama architecture."""
    from qlora.export.gguf import permute_for_llama_rope

    config = json.loads((model_dir / "config.json").read_text())
    arch = gguf.MODEL_ARCH.LLAMA if family == "mixtral" else gguf.MODEL_ARCH.QWEN3MOE
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    weights = {k: v.float().numpy() for k, v in load_file(model_dir / "model.safetensors").items()}
    experts = config.get("num_local_experts") or config["num_experts"]
    expected = {}
    for key, value in weights.items():
        if ".experts." in key:
            stack, _, rest = key.partition(".experts.")
            expert, _, proj = rest.partition(".")
            if expert != "0":
                continue
            value = np.stack([weights[f"{stack}.experts.{e}.{proj}"] for e in range(experts)])
            key = f"{stack}.experts.{proj}"
        elif family == "mixtral" and "q_proj" in key:
            value = permute_for_llama_rope(value, config["num_attention_heads"])
        elif family == "mixtral" and "k_proj" in key:
            value = permute_for_llama_rope(value, config["num_key_value_heads"])
        expected[name_map.get_name(key, try_suffixes=(".weight", ".bias"))] = value
    return expected


@pytest.mark.parametrize("family,arch", [("qwen3_moe", "qwen3moe"), ("mixtral", "llama")])
def test_gguf_of_a_moe_is_llama_cpps_layout(family, arch, tmp_path):
    from qlora.export.gguf import write_gguf

    model_dir = _gguf_checkpoint(family, tmp_path / family)
    reader = gguf.GGUFReader(write_gguf(model_dir, tmp_path / "model.gguf", "f16"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = json.loads((model_dir / "config.json").read_text())
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.expert_count"] == (config.get("num_local_experts") or config["num_experts"])
    assert fields[f"{arch}.expert_used_count"] == 2
    if family == "qwen3_moe":
        assert fields[f"{arch}.expert_feed_forward_length"] == 64
        assert fields[f"{arch}.attention.key_length"] == 16
    expected = _expected_gguf_tensors(model_dir, family)
    assert {t.name for t in reader.tensors} == set(expected)
    for layer in range(2):
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp"):
            assert f"blk.{layer}.{name}.weight" in expected
    for t in reader.tensors:
        want = expected[t.name]
        assert list(t.shape) == list(reversed(want.shape)), t.name
        if want.ndim == 1 or t.name.endswith("ffn_gate_inp.weight"):  # norms and the router stay F32
            assert t.tensor_type == GT.F32, t.name
            np.testing.assert_array_equal(t.data.reshape(want.shape), want, err_msg=t.name)
            continue
        assert t.tensor_type == GT.F16, t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=t.name)


def test_gguf_refuses_other_moe_families_and_incomplete_experts(tmp_path):
    from qlora.export.gguf import write_gguf

    model_dir = tmp_path / "olmoe"
    save_tiny_moe("olmoe", model_dir)
    with pytest.raises(ValueError, match=r"^GGUF export does not support the mixture-of-experts family 'olmoe'"):
        write_gguf(model_dir, tmp_path / "out.gguf")
    broken = _gguf_checkpoint("qwen3_moe", tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.experts.5.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        write_gguf(broken, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))


@pytest.mark.slow  # about 6 s: a run and two exports
def test_export_of_a_moe_run_to_gguf_holds_the_merge(tmp_path):
    """qlora export format=gguf: the fp32 merge (the HF export's tensors) stacked per layer, rounded once to f16;
    format=int8 is refused in one line before anything is merged."""
    model_dir = _gguf_checkpoint("qwen3_moe", tmp_path / "base")
    run_dir = make_moe_run(tmp_path / "run", model_dir)
    with pytest.raises(OptionError, match=r"^format=int8 on the mixture-of-experts model .*qwen3_moe"):
        export_merged(run_dir, tmp_path / "int8", format="int8", progress=False)
    assert not (tmp_path / "int8").exists()

    hf = export_merged(run_dir, tmp_path / "hf", dtype="float32", progress=False)
    out = export_merged(run_dir, tmp_path / "gguf", format="gguf", progress=False)
    reader = gguf.GGUFReader(out / "model-f16.gguf")
    expected = _expected_gguf_tensors(hf, "qwen3_moe")
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        if t.name.endswith("_exps.weight"):
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected[t.name].shape)
            np.testing.assert_array_equal(got, expected[t.name].astype(np.float16).astype(np.float32), err_msg=t.name)


def test_an_expert_adapter_for_another_model_is_named(tmp_path):
    """An adapter whose expert factors do not fit the base's stacks is one error naming the stack."""
    from qlora.export import AdapterMismatchError

    model_dir = save_tiny_moe("qwen3_moe", tmp_path / "base")
    run_dir = make_moe_run(tmp_path / "run", model_dir)
    other = save_tiny_moe("qwen3_moe", tmp_path / "other", moe_intermediate_size=128)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    (adapter / "adapter_model.safetensors").write_bytes((run_dir / "adapter" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterMismatchError, match=r"^adapter module 'model\.layers\.0\.mlp\.experts.*\(model\.layers"
                                                   r"\.0\.mlp\.experts\.(gate_up|down)_proj\) has lora_A"):
        export_merged(adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # about 8 s: a run, a merge and a re-quantization
def test_nf4_export_of_a_moe_run_loads_back_with_4bit_experts(moe_run, tmp_path):
    """format=nf4: the merged experts re-quantized per expert and matrix, in bitsandbytes' per-expert layout;
    qlora loads it back as it is, and it computes what the merged model computes up to that rounding."""
    from qlora.nn.experts import quantized_stacks

    _, _, run_dir, *_ = moe_run
    # The merge in the checkpoint's dtype (bf16), which format=nf4 quantizes.
    hf = export_merged(run_dir, tmp_path / "hf", progress=False)
    out = export_merged(run_dir, tmp_path / "nf4", format="nf4", progress=False)
    saved = load_file(out / "model.safetensors")
    assert any(".experts." in k and k.endswith("weight.quant_state.bitsandbytes__nf4") for k in saved)
    # fp32 compute, like the simulation: a bf16 router can flip a top-k choice, which is not what is tested here.
    model = qlora.load_model(out, qlora.QuantConfig(compute_dtype=torch.float32), device="cpu", dtype=torch.float32,
                             progress=False)
    assert quantized_stacks(model)
    merged = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    requantized = simulated_quantization(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval(), model)
    with torch.no_grad():
        ours, simulated, dense = logits(model).float(), logits(requantized), logits(merged)
    # The 4-bit export is the merged model through one more dequant(quant(W)): it differs from that simulation
    # only by fp32 rounding of differently ordered sums, far less than the re-quantization moves the merged model.
    gap, shift = (ours - simulated).abs().max().item(), (dense - simulated).abs().max().item()
    assert gap <= 1e-2 * shift, (gap, shift)
