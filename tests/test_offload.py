"""device_map offload for 4-bit and 8-bit bases, through accelerate's dispatch hooks. The "GPU"
part of each map runs on the CPU here (device="cpu"); placement and dtype are checked per module."""
import pytest
import torch
from transformers import BitsAndBytesConfig

import qlora
from qlora.lora import attach_lora
from helpers import rel_err
from tiny_models import save_tiny

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
         "model.norm": "cpu", "lm_head": "cpu"}
FORMATS = {
    "int8": (dict(load_in_8bit=True), qlora.Linear8bit),
    "nf4": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32"), qlora.Linear4bit),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("offload") / "dense", dtype=torch.bfloat16)


def _config(fmt, **extra):
    options, _ = FORMATS[fmt]
    return BitsAndBytesConfig(**options, **extra)


def _check_placement(model, layer_class, dense_prefixes):
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and not isinstance(module, qlora.QuantizedLinear):
            continue
        hook = getattr(module, "_hf_hook", None)
        assert hook is not None, f"{name} has no accelerate hook"
        if any(name.startswith(p) for p in dense_prefixes):
            assert type(module) is torch.nn.Linear, f"{name} should stay dense"
            assert hook.offload and module.weight.is_meta, f"{name} should be offloaded"
            stored = hook.weights_map["weight"]
            assert stored.dtype == torch.float32 and stored.device.type == "cpu", name
        else:
            assert isinstance(module, layer_class) and not hook.offload, name
            assert module.weight.device.type == "cpu" and module.weight.dtype in (torch.int8, torch.uint8), name


@pytest.mark.parametrize("fmt", FORMATS)
@torch.no_grad()
def test_dict_map_keeps_offloaded_modules_dense_fp32_and_computes_the_same(model_dir, fmt):
    config = _config(fmt, llm_int8_enable_fp32_cpu_offload=True)
    model = qlora.load_model(model_dir, config, device="cpu", dtype=torch.float32, device_map=SPLIT, progress=False)
    _check_placement(model, FORMATS[fmt][1], ("model.layers.1.", "lm_head"))
    assert model.hf_device_map["model.layers.1"] == "cpu"
    assert model.model.norm._hf_hook.weights_map["weight"].dtype == torch.float32
    # The same function as the model quantized everywhere but layer 1 and the head, those in fp32.
    reference = qlora.load_model(model_dir, _config(fmt, llm_int8_skip_modules=["lm_head", "model.layers.1"]),
                                 device="cpu", dtype=torch.float32, progress=False)
    expected = reference(TOKENS).logits
    assert rel_err(model(TOKENS).logits, expected) < 16 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("fmt", FORMATS)
def test_offload_without_the_flag_gets_transformers_error(model_dir, fmt):
    with pytest.raises(ValueError, match=r"set `llm_int8_enable_fp32_cpu_offload=True` and pass a custom `device_map`"):
        qlora.load_model(model_dir, _config(fmt), device="cpu", device_map=SPLIT, progress=False)


def test_device_map_naming_missing_modules_is_refused(model_dir):
    bad = {**SPLIT, "model.layers.7": "cpu"}
    with pytest.raises(ValueError, match=r"device_map names modules the model does not have: \['model.layers.7'\]; "
                                         r"its top-level modules are \['lm_head', 'model'\]"):
        qlora.load_model(model_dir, _config("int8", llm_int8_enable_fp32_cpu_offload=True), device="cpu",
                         device_map=bad, progress=False)
    partial = {k: v for k, v in SPLIT.items() if k != "lm_head"}
    with pytest.raises(ValueError, match=r"device_map places no device for \['lm_head.weight'\]"):
        qlora.load_model(model_dir, _config("int8", llm_int8_enable_fp32_cpu_offload=True), device="cpu",
                         device_map=partial, progress=False)


@torch.no_grad()
def test_auto_map_with_max_memory_offloads_what_does_not_fit(model_dir):
    config = _config("int8", llm_int8_enable_fp32_cpu_offload=True)
    # About one quantized decoder layer (7 int8 linears: 61 KB) plus the embeddings (16 KB in bf16).
    model = qlora.load_model(model_dir, config, device="cpu", device_map="auto",
                             max_memory={0: 100_000, "cpu": 10**9}, progress=False)
    placements = model.hf_device_map
    offloaded = [name for name, where in placements.items() if where == "cpu"]
    assert offloaded and any(not isinstance(where, str) for where in placements.values())
    _check_placement(model, qlora.Linear8bit, tuple(name + "." if name != "lm_head" else name for name in offloaded))
    assert torch.isfinite(model(TOKENS).logits).all()


def test_disk_offload(model_dir, tmp_path):
    config = _config("int8", llm_int8_enable_fp32_cpu_offload=True)
    disk = {**SPLIT, "model.layers.1": "disk"}
    with pytest.raises(ValueError, match="pass offload_folder=<directory>"):
        qlora.load_model(model_dir, config, device="cpu", device_map=disk, progress=False)
    model = qlora.load_model(model_dir, config, device="cpu", device_map=disk, offload_folder=tmp_path / "off",
                             progress=False)
    on_cpu = qlora.load_model(model_dir, config, device="cpu", device_map=SPLIT, progress=False)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, on_cpu(TOKENS).logits)
    assert any((tmp_path / "off").iterdir())


def test_lora_trains_with_offloaded_modules(model_dir):
    config = _config("int8", llm_int8_enable_fp32_cpu_offload=True)
    model = qlora.load_model(model_dir, config, device="cpu", device_map=SPLIT, progress=False)
    peft_model = attach_lora(model, r=4, target_modules=["q_proj", "v_proj"], gradient_checkpointing=False)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(params) == 8  # A and B of q_proj and v_proj in both layers: the offloaded one included
    assert all(p.device.type == "cpu" for p in params)  # created where the layer runs, not on meta
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = peft_model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        assert all(p.grad is not None for p in params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
