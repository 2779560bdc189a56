"""Quantized MoE checkpoints: the per-expert layout transformers 4.x + bitsandbytes wrote (and the Hub's
`*-bnb-4bit` MoE checkpoints hold) loads as it is, and what qlora saves is that layout, byte for byte.

The oracle checkpoint is written here with bitsandbytes' own quantizer and serializer
(`quantize_4bit`, `QuantState.as_dict(packed=True)`), under the per-expert names transformers' own
`save_pretrained` gave the 16-bit model: every 2-D weight but the embeddings and the head quantized,
the routers included, as bitsandbytes did with nn.Linear routers."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora
from helpers import bnb_functional, requires_bnb
from qlora.nn.experts import held_experts, quantized_stacks
from tiny_moe import build_model, save_tiny_moe

pytestmark = requires_bnb


def write_bnb_checkpoint(source, target, quant_type="nf4", double_quant=True):
    """The 16-bit checkpoint at `source` quantized by bitsandbytes, entry for entry, into `target`."""
    bnb_f = bnb_functional()
    target.mkdir()
    tensors, packed_from = {}, {}
    for key, value in load_file(source / "model.safetensors").items():
        if value.dim() != 2 or "embed" in key or "lm_head" in key:
            tensors[key] = value
            continue
        packed, state = bnb_f.quantize_4bit(value, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        tensors[key] = packed
        packed_from[key] = (packed, state)
        tensors.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                     "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
                                     "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
                                     "llm_int8_skip_modules": None}
    (target / "config.json").write_text(json.dumps(config))
    return packed_from


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_bnb_per_expert_checkpoint_loads_as_it_is(tmp_path, family):
    source = save_tiny_moe(family, tmp_path / "bf16")
    quantized = write_bnb_checkpoint(source, tmp_path / "bnb")
    model = qlora.load_model(tmp_path / "bnb", device="cpu", progress=False)
    bnb_f = bnb_functional()
    stacks = quantized_stacks(model)
    assert len(stacks) == 2 * model.config.num_hidden_layers
    reference = build_model(family, dtype=torch.float32)
    dense = dict(reference.named_parameters())
    for module_name, module, attr in stacks:
        stack = held_experts(module, attr)
        # Every expert's matrix is bitsandbytes' bytes and decodes to bitsandbytes' values.
        for e in range(stack.num_experts):
            for s in range(stack.segments):
                matches = [(k, v) for k, v in quantized.items()
                           if torch.equal(v[0].view(-1), stack.segment(e, s).packed.view(-1))]
                assert matches, f"{module_name}.{attr} expert {e} matrix {s}"
                packed, state = matches[0][1]
                assert torch.equal(stack.segment(e, s).absmax, state.absmax)
        # The model computes with dequant(bitsandbytes' bytes): put them into the fp32 reference.
        values = torch.stack([torch.cat([bnb_f.dequantize_4bit(*quantized[_source_key(quantized, stack, e, s)]).float()
                                         for s in range(stack.segments)]) for e in range(stack.num_experts)])
        dense[f"{module_name}.{attr}"].data.copy_(values)
    for key, (packed, state) in quantized.items():  # attention projections and routers
        name = key.replace("block_sparse_moe", "mlp")
        if "experts." not in key and name in dense:
            dense[name].data.copy_(bnb_f.dequantize_4bit(packed, state).float())
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits
    # bf16 compute against the fp32 model carrying the same decoded weights: bf16 rounding only.
    assert (got - want).norm() / want.norm() < 2e-2


def _source_key(quantized, stack, e, s):
    target = stack.segment(e, s).packed.view(-1)
    return next(k for k, (packed, _) in quantized.items() if torch.equal(packed.view(-1), target))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_saved_checkpoint_is_the_bnb_layout_byte_for_byte(tmp_path, family):
    source = save_tiny_moe(family, tmp_path / "bf16")
    write_bnb_checkpoint(source, tmp_path / "bnb")
    model = qlora.load_model(tmp_path / "bnb", device="cpu", progress=False)
    qlora.save_model(model, tmp_path / "saved")
    original, saved = load_file(tmp_path / "bnb" / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    experts = {k for k in original if ".experts." in k}
    assert experts and experts <= set(saved)
    for key in experts:
        assert torch.equal(saved[key], original[key]), key
    # And back: the saved checkpoint loads to the same stacks.
    again = qlora.load_model(tmp_path / "saved", device="cpu", progress=False)
    for (_, a, p), (_, b, q) in zip(quantized_stacks(model), quantized_stacks(again)):
        x, y = held_experts(a, p), held_experts(b, q)
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("packed", "absmax", "nested_absmax", "offset"))


def test_quantizing_a_16bit_checkpoint_gives_the_bnb_bytes(tmp_path):
    """From bf16, qlora quantizes each checkpoint matrix on its own (gate and up apart), so its save is
    the checkpoint bitsandbytes would have written."""
    source = save_tiny_moe("qwen3_moe", tmp_path / "bf16")
    write_bnb_checkpoint(source, tmp_path / "bnb")
    model = qlora.load_model(source, device="cpu", progress=False)
    qlora.save_model(model, tmp_path / "saved")
    original, saved = load_file(tmp_path / "bnb" / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    for key in (k for k in original if ".experts." in k):
        assert torch.equal(saved[key], original[key]), key


def test_gpt_oss_fused_stacks_round_trip(tmp_path):
    """gpt-oss checkpoints hold fused stacks: qlora writes its per-expert entries under the stack's name
    and reads them back bit for bit."""
    source = save_tiny_moe("gpt_oss", tmp_path / "bf16")
    model = qlora.load_model(source, device="cpu", progress=False)
    qlora.save_model(model, tmp_path / "saved")
    keys = load_file(tmp_path / "saved" / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj.0.weight.absmax" in keys
    again = qlora.load_model(tmp_path / "saved", device="cpu", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_missing_quant_state_of_one_expert_is_one_line(tmp_path):
    source = save_tiny_moe("qwen3_moe", tmp_path / "bf16")
    write_bnb_checkpoint(source, tmp_path / "bnb")
    tensors = load_file(tmp_path / "bnb" / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, tmp_path / "bnb" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: expert 2 of model.layers.1.mlp.experts.gate_up_proj is missing"):
        qlora.load_model(tmp_path / "bnb", device="cpu", progress=False)
