"""The GPTQ format: bit packing for 2/3/4/8 bits (golden vectors), v1/v2 zeros, act-order held
permuted and saved as the checkpoint's, the dispatching ops and autograd, the layer, the config."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora.kernels import set_backend
from qlora.kernels.gptq.format import pack, unpack
from qlora.nn.quantized import layer_class
from qlora.quant import get_format
from helpers import rel_err

VECTORS = json.loads((Path(__file__).parent / "golden" / "gptq_vectors.json").read_text())


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_packing_matches_the_golden_vectors(name):
    case = VECTORS[name]
    bits, codes = case["bits"], torch.tensor(case["codes"])
    qweight = pack(codes, bits, dim=0)
    assert qweight.tolist() == case["qweight"]
    assert pack(torch.tensor(case["zeros"]) - 1, bits, dim=1).tolist() == case["qzeros"]
    assert torch.equal(unpack(qweight, bits, codes.shape[0], dim=0), codes.int())
    tensors = {"qweight": torch.tensor(case["qweight"], dtype=torch.int32),
               "qzeros": torch.tensor(case["qzeros"], dtype=torch.int32),
               "scales": torch.tensor(case["scales"], dtype=torch.float16),
               "g_idx": torch.tensor(case["g_idx"], dtype=torch.int32)}
    weight = qlora.GPTQWeight.from_checkpoint(tensors, where=name)  # bits read from the shapes
    assert weight.bits == bits
    assert (weight.perm is not None) == ("act_order" in name)
    assert torch.equal(weight.dequantize(torch.float32), torch.tensor(case["dequantized"], dtype=torch.float32))
    # The saved form is the checkpoint's own, act-order included.
    assert all(torch.equal(weight.checkpoint_tensors()[k], tensors[k]) for k in tensors)


def test_the_golden_vectors_cover_every_bit_width_with_and_without_act_order():
    # They carry the format check where GPTQModel is not installed (tests/test_gptq_oracle.py skips).
    covered = {(case["bits"], "act_order" in name) for name, case in VECTORS.items()}
    assert covered == {(bits, act_order) for bits in (2, 3, 4, 8) for act_order in (False, True)}
    assert {case["bits"] for case in VECTORS.values() if case["group_size"] == -1} == {3, 4}


def test_three_bit_values_straddle_words_as_specified():
    values = torch.zeros(32, 1, dtype=torch.int64)
    values[10] = 0b111  # low 2 bits at 30-31 of word 0, high bit at bit 0 of word 1
    assert [w & 0xFFFFFFFF for w in pack(values, 3, 0).flatten().tolist()] == [0xC0000000, 0x1, 0x0]
    values[10], values[21] = 0, 0b111  # low bit at 31 of word 1, high 2 bits at 0-1 of word 2
    assert [w & 0xFFFFFFFF for w in pack(values, 3, 0).flatten().tolist()] == [0x0, 0x80000000, 0x3]


@pytest.mark.parametrize("bits, word", [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_v1_zeros_store_z_minus_one(bits, word):
    weight = qlora.GPTQWeight.quantize(torch.randn(64, 64), bits=bits, group_size=32, sym=True)
    assert {w & 0xFFFFFFFF for w in weight.qzeros.flatten().tolist()} == {word}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_round_to_nearest_error_halves_per_bit(bits, group_size, sym):
    w = torch.randn(64, 96)
    weight = qlora.GPTQWeight.quantize(w, bits=bits, group_size=group_size, sym=sym)
    # Uniform grid of 2**bits - 1 steps over a group's range: relative RMS error ~ range / (2**bits * sqrt(12) * rms).
    assert rel_err(weight.dequantize(torch.float32), w) < 4.0 / 2**bits


def test_v2_checkpoints_store_the_zero_itself():
    w = torch.randn(32, 64)
    v1 = qlora.GPTQWeight.quantize(w, bits=4, group_size=32, sym=False)
    v2_zeros = pack(unpack(v1.qzeros, 4, 32, dim=1) + 1, 4, dim=1)  # what GPTQModel's v1->v2 conversion writes
    tensors = {**v1.checkpoint_tensors(), "qzeros": v2_zeros}
    v2 = qlora.GPTQWeight.from_checkpoint(tensors, checkpoint_format="gptq_v2")
    assert torch.equal(v2.dequantize(torch.float32), v1.dequantize(torch.float32))


def test_act_order_is_permuted_once_and_saved_as_the_checkpoint():
    from qlora.quant.gptq.solver import gptq_quantize

    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    w = torch.randn(24, 64)
    result = gptq_quantize(w, 2 * x.T @ x / 256, bits=4, group_size=16, desc_act=True)
    weight = result.weight
    assert weight.perm is not None and bool((weight.g_idx[1:] >= weight.g_idx[:-1]).all())
    saved = weight.checkpoint_tensors()
    assert not bool((saved["g_idx"][1:] >= saved["g_idx"][:-1]).all())  # the checkpoint's order is act-order's
    again = qlora.GPTQWeight.from_checkpoint(saved, desc_act=True)
    assert torch.equal(again.dequantize(torch.float32), result.dequantized)
    inputs = torch.randn(5, 64, requires_grad=True)
    out = F.linear(inputs, weight)
    assert rel_err(out, inputs @ result.dequantized.T) < 1e-6
    grad = torch.randn_like(out)
    out.backward(grad)
    assert rel_err(inputs.grad, grad @ result.dequantized) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_backward_state_dict(dtype):
    linear = torch.nn.Linear(96, 40)
    layer = qlora.LinearGPTQ.from_linear(linear, compute_dtype=dtype, bits=3, group_size=32)
    assert layer_class("gptq") is qlora.LinearGPTQ and get_format("gptq") is qlora.GPTQWeight
    x = torch.randn(2, 3, 96, requires_grad=True)
    dense = layer.dequantize(torch.float32)
    y = layer(x)
    eps = torch.finfo(dtype).eps
    expected = x.detach() @ dense.T + linear.bias.detach().to(dtype).float()
    assert rel_err(y, expected) < 4 * eps * 96**0.5
    y.sum().backward()
    assert rel_err(x.grad, torch.ones(2, 3, 40) @ dense) < 4 * eps * 40**0.5
    state = layer.state_dict()
    assert set(state) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    fresh = qlora.LinearGPTQ(96, 40, compute_dtype=dtype, bits=3, group_size=32)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dequantize(torch.float32), dense)
    # qweight 9 x 40 words, qzeros 3 groups x ceil(40*3/32) = 4 words, fp16 scales, int32 g_idx
    assert layer.quantized_weight.nbytes == 9 * 40 * 4 + 3 * 4 * 4 + 3 * 40 * 2 + 96 * 4


def test_every_gptq_dequantize_and_matmul_dispatches_through_the_op():
    layer = qlora.LinearGPTQ.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.float32, group_size=32)
    set_backend("triton")
    try:
        for call in (lambda: layer.dequantize(), lambda: layer(torch.randn(2, 64))):
            with pytest.raises(RuntimeError, match="QLORA_BACKEND=triton cannot run on cpu tensors"):
                call()
    finally:
        set_backend(None)
    compiled = torch.compile(lambda x: layer(x), fullgraph=True, backend="eager")
    x = torch.randn(3, 64)
    assert torch.equal(compiled(x), layer(x))


def test_bad_input_gets_one_clear_line():
    with pytest.raises(ValueError, match=r"GPTQ bits must be one of \[2, 3, 4, 8\], got 5"):
        qlora.GPTQQuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size must be -1 .* got 0"):
        qlora.GPTQQuantConfig(group_size=0)
    weight = qlora.GPTQWeight.quantize(torch.randn(32, 64), group_size=32)
    tensors = weight.checkpoint_tensors()
    with pytest.raises(ValueError, match=r"layer.qweight: qweight must be int32 \[8, 32\].*got int32 \[7, 32\]"):
        qlora.GPTQWeight.from_checkpoint({**tensors, "qweight": tensors["qweight"][:7]}, where="layer.qweight", bits=4)
    with pytest.raises(ValueError, match=r"qweight must be int32 \[8, 5\] for a 4-bit \[5, 64\] weight.* shapes are inconsistent"):
        qlora.GPTQWeight.from_checkpoint({**tensors, "scales": tensors["scales"][:, :5]}, where="layer.qweight", bits=4)
    with pytest.raises(ValueError, match=r"shapes are inconsistent: qweight \[8, 32\].* fit no width"):
        qlora.GPTQWeight.from_checkpoint({**tensors, "g_idx": tensors["g_idx"][:40]})
    with pytest.raises(ValueError, match="g_idx holds groups outside"):
        qlora.GPTQWeight.from_checkpoint({**tensors, "g_idx": tensors["g_idx"] + 5})
    with pytest.raises(NotImplementedError, match="checkpoint_format='marlin' is a repacked layout"):
        qlora.quant.config.quant_config_from_any({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"})
    with pytest.raises(NotImplementedError, match="'gptq_p' is a repacked layout"):
        qlora.quant.config.quant_config_from_any({"quant_method": "gptq", "bits": 4, "format": "gptq_p"})


def test_config_reads_transformers_gptqconfig_and_writes_both_files():
    from transformers import GPTQConfig

    hf = GPTQConfig(bits=3, group_size=64, desc_act=True, sym=False, dataset=["some text"], damp_percent=0.05)
    assert qlora.quant.config.quant_config_from_any(hf).bits == 3  # the object itself
    # (transformers checks for optimum when modules_in_block_to_quantize is set: pass it in the dict form)
    config = qlora.quant.config.quant_config_from_any(
        {**hf.to_dict(), "modules_in_block_to_quantize": [["self_attn.q_proj"], ["mlp.down_proj"]]})
    assert isinstance(config, qlora.GPTQQuantConfig)
    assert (config.bits, config.group_size, config.desc_act, config.sym, config.damp_percent) == (3, 64, True, False, 0.05)
    assert config.dataset == ["some text"] and config.quantizes("model.layers.0.mlp.down_proj")
    assert not config.quantizes("model.layers.0.mlp.up_proj")
    written = config.to_hf_dict()
    # transformers' own keys are all there (its from_dict needs optimum installed, which tests do not)
    assert set(hf.to_dict()) - {"backend", "act_group_aware", "max_input_length"} <= set(written)
    assert qlora.quant.config.quant_config_from_any(written).to_hf_dict() == written
    side = json.loads(config.extra_files()["quantize_config.json"])
    assert side["checkpoint_format"] == "gptq" and side["desc_act"] is True and side["bits"] == 3
