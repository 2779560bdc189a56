"""gpt-oss as published: experts in MXFP4 (`*_blocks` / `*_scales`), held as they are. transformers'
own MXFP4 dequantization (`Mxfp4Config(dequantize=True)`) is the oracle of the decoded values."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qlora
from qlora.nn import QuantizedLinear
from qlora.nn.experts import held_experts, quantized_stacks
from qlora.quant.mxfp4 import ExpertWeightMXFP4, dequantize_mxfp4, quantize_mxfp4
from qlora.quant.nf4.weight import Weight4bit
from tiny_moe import build_model

MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def write_mxfp4_checkpoint(directory):
    """A tiny gpt-oss written by save_pretrained, its experts turned into MXFP4 blocks and scales."""
    model = build_model("gpt_oss")
    model.save_pretrained(directory / "bf16")
    tensors = {}
    for key, value in load_file(directory / "bf16" / "model.safetensors").items():
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[key] = value
            continue
        stack = value.transpose(1, 2)  # the module's [E, in, out] -> the checkpoint's [E, out, in]
        experts, rows, cols = stack.shape
        packed, scales = zip(*(quantize_mxfp4(stack[e]) for e in range(experts)))
        tensors[f"{key}_blocks"] = torch.stack(packed).view(experts, rows, cols // 32, 16)
        tensors[f"{key}_scales"] = torch.stack(scales).view(experts, rows, cols // 32)
    (directory / "mxfp4").mkdir()
    save_file(tensors, directory / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "bf16" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED}
    (directory / "mxfp4" / "config.json").write_text(json.dumps(config))
    return directory / "mxfp4"


def transformers_dequantized(path):
    from transformers import Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                quantization_config=Mxfp4Config(dequantize=True)).eval()


def test_decode_matches_the_ocp_values():
    codes = torch.arange(256, dtype=torch.uint8).repeat(2)  # every byte twice: 1024 elements, 32 blocks
    scales = torch.tensor([127, 126, 130, 100] * 8, dtype=torch.uint8)
    decoded = dequantize_mxfp4(codes, scales, (1, 1024), torch.float32).view(-1)
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    for i in (0, 1, 17, 255, 256 + 3, 1023):
        byte, scale = codes[i // 2].item(), scales[i // 32].item()
        nibble = byte & 0xF if i % 2 == 0 else byte >> 4  # the first element in the LOW nibble
        value = (-1 if nibble & 8 else 1) * e2m1[nibble & 7] * 2.0 ** (scale - 127)
        assert decoded[i].item() == value, i


def test_quantizer_rounds_to_nearest_and_decoded_values_are_fixed_points():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    packed, scales = quantize_mxfp4(weight)
    decoded = dequantize_mxfp4(packed, scales, (16, 64), torch.float32)
    # Each element is the nearest point of its block's grid (the 15 E2M1 values x 2^(scale - 127); values
    # past 6 x 2^e saturate to it), by brute force over the grid.
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6])
    points = grid * torch.exp2(scales.view(-1, 1, 1).float() - 127)  # [blocks, 1, 15], exact powers of two
    nearest = (weight.view(-1, 32, 1) - points).abs().min(dim=-1).values
    assert torch.equal((decoded - weight).view(-1, 32).abs(), nearest)
    again = dequantize_mxfp4(*quantize_mxfp4(decoded), (16, 64), torch.float32)
    assert torch.equal(again, decoded)


def test_published_gpt_oss_loads_mxfp4_experts_as_they_are(tmp_path):
    path = write_mxfp4_checkpoint(tmp_path)
    model = qlora.load_model(path, device="cpu", progress=False)
    reference = transformers_dequantized(path)
    blocks = load_file(path / "model.safetensors")
    stacks = quantized_stacks(model)
    assert len(stacks) == 2 * model.config.num_hidden_layers
    for module_name, module, attr in stacks:
        stack = held_experts(module, attr)
        assert isinstance(stack, ExpertWeightMXFP4)
        assert torch.equal(stack.packed.view(-1), blocks[f"{module_name}.{attr}_blocks"].view(-1))
        decoded = getattr(reference.get_submodule(module_name), attr).data
        assert torch.equal(stack.dequantize(torch.bfloat16).transpose(1, 2), decoded)
    # The reference with the same quantized attention (NF4 + DQ of the same bf16 weights): then only bf16
    # rounding of differently ordered sums separates the two.
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, QuantizedLinear):
                dense = reference.get_submodule(name).weight
                dense.copy_(Weight4bit.quantize(dense).dequantize(dense.dtype))
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        ours, theirs = model(ids).logits.float(), reference(ids).logits.float()
    assert (ours - theirs).norm() / theirs.norm() < 2e-2


def test_mxfp4_experts_save_as_published_and_train_lora(tmp_path):
    path = write_mxfp4_checkpoint(tmp_path)
    model = qlora.load_model(path, device="cpu", progress=False)
    qlora.save_model(model, tmp_path / "saved")
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    for key in (k for k in original if k.endswith(("_blocks", "_scales"))):
        assert torch.equal(saved[key], original[key]), key
    again = qlora.load_model(tmp_path / "saved", device="cpu", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    # LoRA on the MXFP4 experts: gradients reach the expert adapters.
    from qlora.lora import attach_lora

    peft_model = attach_lora(again, r=4, lora_alpha=8, target_modules="all-linear", gradient_checkpointing=False)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    expert_grads = [p.grad for n, p in peft_model.named_parameters() if "experts" in n and p.requires_grad]
    assert expert_grads and any(g is not None and g.abs().sum() > 0 for g in expert_grads)


@pytest.mark.parametrize("damage", ["scales", "shape"])
def test_damaged_mxfp4_experts_are_one_line(tmp_path, damage):
    path = write_mxfp4_checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_proj"
    if damage == "scales":
        del tensors[f"{key}_scales"]
        match = rf"{key}_blocks has no {key}_scales beside it"
    else:
        tensors[f"{key}_blocks"] = tensors[f"{key}_blocks"][:, :-2].contiguous()
        tensors[f"{key}_scales"] = tensors[f"{key}_scales"][:, :-2].contiguous()
        match = rf"{key}_blocks holds experts of .* expects"
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
        qlora.load_model(path, device="cpu", progress=False)
