"""Llama-4's text experts in 4 bits: its experts module computes its own bmm, so qlora swaps it for a module of
the same contract (qlora.nn.bmm_experts); each expert's gate, up and down are quantized [out, in], as the
nn.Linear of a bitsandbytes Llama-4 checkpoint (transformers' SequentialLlama4TextExperts) holds them. The family battery
(tests/test_moe.py, tiny_moe.FAMILIES) and the PEFT round trip (tests/test_moe_lora.py) run it too."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qlora
from qlora.nn.bmm_experts import BmmExperts
from qlora.nn.experts import held_experts, held_state, quantized_stacks
from helpers import bnb_functional, requires_bnb
from tiny_moe import build_model, save_tiny_moe

SIZES = dict(hidden_size=128, intermediate_size=128)  # every matrix a whole number of 64-blocks


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    path = save_tiny_moe("llama4_text", tmp_path_factory.mktemp("llama4"), **SIZES)
    return path, qlora.load_model(path, device="cpu", progress=False)


def test_experts_are_swapped_and_no_matrix_stays_16bit(llama4):
    path, model = llama4
    experts = [m for m in model.modules() if isinstance(m, BmmExperts)]
    assert len(experts) == 2 and all(m.replaces == "Llama4TextExperts" for m in experts)
    assert len(quantized_stacks(model)) == 4
    gate_up = held_experts(experts[0], "gate_up_proj")
    # Held [E, out, in] = [4, 2 x 128, 128], gate and up two matrices per expert; down [4, 128, 128].
    assert tuple(gate_up.shape) == (4, 256, 128) and gate_up.segments == 2
    assert tuple(held_experts(experts[0], "down_proj").shape) == (4, 128, 128)
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dim() >= 2:
            assert "embed" in name or "lm_head" in name or name.endswith("router.weight"), name


@requires_bnb
def test_each_expert_matrix_is_what_bitsandbytes_gives_for_its_linear(llama4):
    """A bitsandbytes Llama-4 checkpoint holds one Linear4bit per expert and projection
    (`SequentialLlama4TextExperts`): gate_proj.weight = gate_up_proj[e][:, :I]^T, [out, in]."""
    bnb_f = bnb_functional()
    path, model = llama4
    tensors = load_file(path / "model.safetensors")
    module = model.model.layers[1].feed_forward.experts
    gate_up, down = held_experts(module, "gate_up_proj"), held_experts(module, "down_proj")
    dense_gate_up = tensors["model.layers.1.feed_forward.experts.gate_up_proj"]  # [E, H, 2I], the file's layout
    dense_down = tensors["model.layers.1.feed_forward.experts.down_proj"]  # [E, I, H]
    half = dense_gate_up.shape[2] // 2
    for e in range(4):
        matrices = ((gate_up, 0, dense_gate_up[e][:, :half].t()), (gate_up, 1, dense_gate_up[e][:, half:].t()),
                    (down, 0, dense_down[e].t()))
        for stack, s, matrix in matrices:
            packed, state = bnb_f.quantize_4bit(matrix.contiguous(), blocksize=64, compress_statistics=True,
                                                quant_type="nf4")
            ours = stack.segment(e, s)
            assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1)), (e, s)
            assert torch.equal(ours.absmax, state.as_dict(packed=True)["absmax"]), (e, s)
            rows = slice(s * matrix.shape[0], (s + 1) * matrix.shape[0])
            assert torch.equal(stack.dequantize_expert(e, torch.bfloat16)[rows], bnb_f.dequantize_4bit(packed, state))


def test_saved_model_loads_back_bit_for_bit(llama4, tmp_path):
    _, model = llama4
    qlora.save_model(model, tmp_path / "nf4")
    again = qlora.load_model(tmp_path / "nf4", device="cpu", progress=False)
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in again.state_dict().items())
    for (_, module, attr), (_, theirs, _) in zip(quantized_stacks(model), quantized_stacks(again)):
        for field, buffer in held_state(module, attr).items():  # the scales too
            assert torch.equal(held_state(theirs, attr)[field], buffer), (attr, field)


def test_footprint_like_a_dense_model(llama4):
    _, model = llama4
    from test_moe import assert_footprint_like_a_dense_model

    assert_footprint_like_a_dense_model(model, build_model("llama4_text", **SIZES))


def test_logits_match_the_simulated_quantization_and_training_moves_the_experts(llama4):
    from test_moe import simulated_quantization
    from test_moe_lora import _train
    from qlora.lora import attach_lora

    path, _ = llama4
    model = qlora.load_model(path, device="cpu", progress=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        bf16 = reference(ids).logits.float()
        simulated = simulated_quantization(reference, model)(ids).logits.float()
        ours = model(ids).logits.float()
    gap, shift = (ours - simulated).abs().max().item(), (bf16 - simulated).abs().max().item()
    assert gap <= 0.25 * shift + 1e-2, (gap, shift)

    model = attach_lora(model, r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=True)
    losses = _train(model.train(), ids, steps=3)
    assert losses[-1] < losses[0]
    grads = [p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert len(grads) == 4 and all(p.abs().sum() > 0 for p in grads)  # the experts' adapters trained


def test_export_on_the_original_base_is_peft_merge(tmp_path):
    """base=original keeps transformers' own Llama4TextExperts in the merge skeleton: its stack merges in the
    orientation stock PEFT gives the adapter there (the quantized-base merges run in tests/test_moe_export.py)."""
    from qlora.export import export_merged
    from test_moe_export import _assert_same_weights, make_moe_run, peft_merged

    model_dir = save_tiny_moe("llama4_text", tmp_path / "base")
    run_dir = make_moe_run(tmp_path / "run", model_dir)
    out = export_merged(run_dir, tmp_path / "original", base="original", dtype="float32", progress=False)
    _assert_same_weights(out, peft_merged(model_dir, run_dir, simulate=False)[0], tmp_path / "peft_original")


@requires_bnb
def test_saved_checkpoint_loads_in_transformers_and_bitsandbytes(llama4, tmp_path):
    """qlora writes each expert matrix under the names a bitsandbytes Llama-4 checkpoint has
    (`experts.{e}.gate_proj.weight` + quant state): transformers + bitsandbytes loads it as
    SequentialLlama4TextExperts of Linear4bit with the same bytes (and qlora reads it back, above).
    transformers 5.25 cannot save such a model again (its bitsandbytes load op has no reverse)."""
    from test_moe import simulated_quantization

    bnb_functional()  # bitsandbytes' CPU backend, quietly
    path, model = llama4
    qlora.save_model(model, tmp_path / "nf4")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", dtype=torch.bfloat16).eval()
    experts = theirs.model.layers[1].feed_forward.experts
    assert type(experts).__name__ == "SequentialLlama4TextExperts"
    ours = model.model.layers[1].feed_forward.experts
    gate_up, down = held_experts(ours, "gate_up_proj"), held_experts(ours, "down_proj")
    for e in range(4):
        for linear, stack, s in ((experts[e].gate_proj, gate_up, 0), (experts[e].up_proj, gate_up, 1),
                                 (experts[e].down_proj, down, 0)):
            assert torch.equal(linear.weight.data.reshape(-1), stack.segment(e, s).packed.reshape(-1)), (e, s)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        bf16 = reference(ids).logits
        simulated = simulated_quantization(reference, model)(ids).logits
        # bitsandbytes' CPU kernels round more than ours (here 0.04 against 0.006 from the fp32 simulation),
        # far less than quantization moves the logits (0.15).
        assert (theirs(ids).logits.float() - simulated).abs().max() <= 0.5 * (bf16 - simulated).abs().max()
