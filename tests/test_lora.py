"""LoRA / DoRA adapters on 4-bit models through PEFT's custom-module dispatch."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import qlora
from qlora.lora import (LoraLinear4bit, attach_lora, describe_trainable, load_lora, lora_config,
                        resolve_target_modules, trainable_parameters)
from qlora.nn import Linear4bit
from helpers import rel_err, rounding_tolerance
from tiny_models import VOCAB, build_model, save_tiny

FP32 = qlora.QuantConfig(compute_dtype=torch.float32)
LEAVES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(family, root / family, dtype=torch.float32) for family in LEAVES}


def load(checkpoints, family="llama", config=FP32):
    return qlora.load_model(checkpoints[family], config, device="cpu", progress=False)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 11))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def dense_twin(model, family):
    """The plain transformers model carrying the weights the 4-bit model computes with (adapters left out)."""
    dense = build_model(family)
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            dense.get_submodule(name.removesuffix(".base_layer")).weight.data = module.dequantize(torch.float32)
    return dense


def train_steps(model, ids, steps, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---- training ----------------------------------------------------------------------------------

def test_only_adapters_train_and_the_loss_drops(checkpoints, ids):
    model = attach_lora(load(checkpoints), r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 2 * len(LEAVES["llama"])
    losses = train_steps(model, ids, steps=4)
    assert losses[-1] < losses[0] - 0.05, losses
    for module in model.modules():
        if isinstance(module, Linear4bit):
            assert module.weight.grad is None and not module.weight.requires_grad
    # Counts: 4-bit weights at their logical size, so the total is the dense model's plus the adapters.
    n_trainable, total = trainable_parameters(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in build_model("llama").parameters()) + n_trainable
    assert describe_trainable(model) == (f"trainable params: {n_trainable:,} || all params: {total:,} || "
                                         f"trainable%: {100 * n_trainable / total:.4g}")


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints, ids):
    grads = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model = attach_lora(load(checkpoints), r=4, init_lora_weights=False, gradient_checkpointing=checkpointing)
        model.train()
        assert model.base_model.model.model.gradient_checkpointing is checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


# ---- saving and loading elsewhere --------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(LEAVES))
def test_plain_peft_adapter_loads_on_a_dense_base(family, checkpoints, ids, tmp_path):
    model = attach_lora(load(checkpoints, family), r=4, init_lora_weights=False, gradient_checkpointing=False)
    model.eval()
    ours = logits(model, ids)
    with model.disable_adapter():
        assert rel_err(logits(model, ids), ours) > 1e-3  # the adapter is not a no-op
    model.save_pretrained(tmp_path / "adapter")

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                           for k in tensors), sorted(tensors)[:4]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(LEAVES[family]) and saved["peft_type"] == "LORA"

    dense = PeftModel.from_pretrained(dense_twin(model.get_base_model(), family), tmp_path / "adapter")
    assert rel_err(logits(dense, ids), ours) < 1e-5
    # Against the original (unquantized) base: only the NF4 error remains.
    original = PeftModel.from_pretrained(build_model(family), tmp_path / "adapter")
    assert rel_err(logits(original, ids), ours) < 0.2
    # And back onto a fresh 4-bit model.
    again = load_lora(load(checkpoints, family), tmp_path / "adapter")
    assert torch.equal(logits(again, ids), ours)


def test_dora(checkpoints, ids, tmp_path):
    model = attach_lora(load(checkpoints), r=4, use_dora=True, init_lora_weights=False, gradient_checkpointing=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    # The magnitude starts at the row norms of the dequantized W + scaling * B @ A.
    expected = (layer.base_layer.dequantize(torch.float32) + layer.get_delta_weight("default")).norm(dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, expected)
    trainable = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}
    train_steps(model, ids, steps=2)
    model.eval()
    ours = logits(model, ids)
    model.save_pretrained(tmp_path / "dora")
    dense = PeftModel.from_pretrained(dense_twin(model.get_base_model(), "llama"), tmp_path / "dora")
    assert rel_err(logits(dense, ids), ours) < 1e-5


def test_dora_with_dropout_trains(checkpoints, ids):
    model = attach_lora(load(checkpoints), r=4, use_dora=True, lora_dropout=0.1, gradient_checkpointing=False)
    losses = train_steps(model, ids, steps=3)
    assert losses[-1] < losses[0]


# ---- configuration -----------------------------------------------------------------------------

def test_all_linear_includes_dense_linears_but_not_the_head(checkpoints):
    config = qlora.QuantConfig(compute_dtype=torch.float32, skip_modules=["lm_head", "o_proj"])
    base = load(checkpoints, config=config)
    assert isinstance(base.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    assert resolve_target_modules(base, "all-linear") == LEAVES["llama"]
    model = attach_lora(base, r=4, gradient_checkpointing=False)
    assert type(model.base_model.model.model.layers[0].self_attn.o_proj).__name__ == "Linear"  # PEFT's lora.Linear
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)
    assert isinstance(model.base_model.model.lm_head, torch.nn.Linear)
    assert resolve_target_modules(model, "all-linear") == LEAVES["llama"]  # adapters' own linears left out
    assert resolve_target_modules(base, ["q_proj", "model.layers.1.mlp.up_proj"]) == ["q_proj", "model.layers.1.mlp.up_proj"]


def test_bad_target_module_name(checkpoints):
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no module of LlamaForCausalLM; "
                                         r"its linear layers are \['down_proj', 'gate_proj', .*'v_proj'\]"):
        attach_lora(load(checkpoints), target_modules=["q_proj", "qkv"])


def test_rslora_scaling(checkpoints, ids):
    for use_rslora, scaling in ((False, 8 / 4), (True, 8 / 2)):
        model = attach_lora(load(checkpoints), r=4, lora_alpha=8, use_rslora=use_rslora, init_lora_weights=False,
                            gradient_checkpointing=False)
        layer = model.base_model.model.model.layers[0].mlp.up_proj
        assert layer.scaling["default"] == scaling
        x = torch.randn(3, layer.in_features)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = layer.base_layer(x) + scaling * x @ a.T @ b.T
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer.get_delta_weight("default"), scaling * b @ a)


def test_multiple_adapters_and_mixed_batches(checkpoints, ids):
    model = attach_lora(load(checkpoints), r=4, init_lora_weights=False, gradient_checkpointing=False)
    model.add_adapter("other", lora_config(model, r=2, init_lora_weights=False))
    model.eval()
    base = logits(model, ids, adapter_names=["__base__"] * 2)
    # Mixed batches compute each row's adapter apart: the same math, summed in another order. About six
    # matmuls in series per layer plus the head, over reductions of at most intermediate_size.
    config = model.config
    ops, reduction = 6 * config.num_hidden_layers + 1, config.intermediate_size
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=rounding_tolerance(base, reduction, ops))
    first = logits(model, ids)
    model.set_adapter("other")
    second = logits(model, ids)
    mixed = logits(model, ids, adapter_names=["default", "other"])
    torch.testing.assert_close(mixed[0], first[0], rtol=0, atol=rounding_tolerance(first, reduction, ops))
    torch.testing.assert_close(mixed[1], second[1], rtol=0, atol=rounding_tolerance(second, reduction, ops))
    assert rel_err(first, second) > 1e-3


def test_merge_is_refused_with_the_alternative(checkpoints):
    model = attach_lora(load(checkpoints), r=4, gradient_checkpointing=False)
    with pytest.raises(NotImplementedError, match="4-bit .* not supported.*adapter separate.*qlora's export"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="not supported"):
        model.base_model.model.model.layers[0].self_attn.q_proj.merge()
    model.unmerge_adapter()  # nothing was merged: PEFT's own housekeeping call stays harmless


@pytest.mark.parametrize("options,message", [
    (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' is not supported on quantized layers"),
    (dict(alora_invocation_tokens=[1, 2]), r"supports plain LoRA and DoRA \(use_dora=True\) only"),
])
def test_unsupported_options(checkpoints, options, message):
    with pytest.raises(NotImplementedError, match=message):
        attach_lora(load(checkpoints), gradient_checkpointing=False, **options)


def test_all_linear_needs_the_model():
    with pytest.raises(ValueError, match="needs the model"):
        lora_config(target_modules="all-linear")


def test_attaching_and_loading_an_adapter_warns_nothing(checkpoints, tmp_path):
    # PEFT reads an attribute transformers 5 deprecates; a user saw its FutureWarning on every run.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = attach_lora(load(checkpoints), r=4)
        model.save_pretrained(tmp_path / "adapter")
        load_lora(load(checkpoints), tmp_path / "adapter")


@pytest.mark.parametrize("scaling,bias", [(2.0, False), (0.25, True), (1 / 3, False)])
def test_the_adapter_sum_is_peft_s_form(scaling, bias):
    from qlora.lora import LoraQuantizedLinear

    torch.manual_seed(0)
    result = torch.randn(3, 5, 24, requires_grad=True)
    hidden = torch.randn(3, 5, 4, requires_grad=True)
    lora_b = torch.nn.Linear(4, 24, bias=bias)
    grad = torch.randn(3, 5, 24)
    fused = LoraQuantizedLinear._add_lora(result, hidden, lora_b, scaling)
    fused.backward(grad)
    fused_grads = [t.grad.clone() for t in (result, hidden, lora_b.weight)]
    for t in (result, hidden, lora_b.weight):
        t.grad = None
    reference = result + lora_b(hidden) * scaling  # PEFT's LoRA Linear
    reference.backward(grad)
    if scaling == 2.0:  # a power of two scales exactly: the same bits
        assert torch.equal(fused, reference)
    # fp32 sums of 4 products, one rounding apart: a few ulp of values ~1.
    assert rel_err(fused, reference) < 1e-6
    for got, want in zip(fused_grads, (result.grad, hidden.grad, lora_b.weight.grad)):
        assert rel_err(got, want) < 1e-6
    # Different dtypes take PEFT's own form (promotion and all).
    mixed = LoraQuantizedLinear._add_lora(result.detach().bfloat16(), hidden.detach(), lora_b, scaling)
    assert mixed.dtype == torch.float32
