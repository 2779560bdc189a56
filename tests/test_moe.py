"""Mixture-of-experts in 4 bits: the expert stack format, the grouped matmul, and loading every MoE family
from what transformers' own save_pretrained writes."""
import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qlora
from qlora.nn import QuantizedLinear
from qlora.nn.bmm_experts import BmmExperts
from qlora.nn.experts import grouped_linear, held_experts, held_state, is_experts_module, quantized_stacks
from qlora.quant.nf4.experts import ExpertWeight4bit
from qlora.quant.nf4.weight import Weight4bit
from helpers import bnb_functional, requires_bnb
from tiny_moe import FAMILIES, build_model, save_tiny_moe


# ---- the stack format -----------------------------------------------------------------------------
@requires_bnb
@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(("nf4", "fp4"), (True, False))))
def test_each_expert_is_what_bitsandbytes_gives_for_its_matrix(quant_type, double_quant):
    bnb_f = bnb_functional()
    torch.manual_seed(0)
    # Experts of different scales: one offset per expert (a shared one would be a different format).
    stack = (torch.randn(3, 48, 128) * torch.tensor([0.02, 1.0, 30.0])[:, None, None]).to(torch.bfloat16)
    weight = ExpertWeight4bit.quantize(stack, quant_type=quant_type, double_quant=double_quant, blocksize=64)
    assert weight.packed.shape == (3, 48 * 128 // 2) and weight.absmax.shape == (3, 48 * 128 // 64)
    for e in range(3):
        packed, state = bnb_f.quantize_4bit(stack[e], blocksize=64, compress_statistics=double_quant,
                                            quant_type=quant_type)
        assert torch.equal(weight.packed[e], packed.view(-1))
        expected = state.as_dict(packed=True)
        assert torch.equal(weight.absmax[e], expected["absmax"])
        if double_quant:
            assert torch.equal(weight.nested_absmax[e], expected["nested_absmax"])
            assert weight.offset[e].item() == state.offset.item()
        # An expert read out of the stack is an ordinary 4-bit weight, bitsandbytes' dequantization included.
        assert torch.equal(weight.dequantize_expert(e, torch.bfloat16), bnb_f.dequantize_4bit(packed, state))


def test_stack_checkpoint_entries_are_per_expert_weights():
    torch.manual_seed(1)
    stack = torch.randn(2, 64, 64)
    weight = ExpertWeight4bit.quantize(stack)
    entries = weight.checkpoint_tensors()
    single = Weight4bit.from_checkpoint({k[2:]: v for k, v in entries.items() if k.startswith("1.")})
    assert torch.equal(single.dequantize(torch.float32), weight.dequantize(torch.float32)[1])
    again = ExpertWeight4bit.from_checkpoint(entries)
    for name, tensor in weight.tensors().items():
        assert torch.equal(getattr(again, name), tensor), name
    with pytest.raises(ValueError, match="expert stack: expert 0 is missing"):
        ExpertWeight4bit.from_checkpoint({k: v for k, v in entries.items() if not k.startswith("0.")})


def test_batched_linear_and_refusals():
    torch.manual_seed(2)
    weight = ExpertWeight4bit.quantize(torch.randn(3, 32, 64))
    x = torch.randn(3, 5, 64)
    y = weight.linear(x, torch.ones(3, 32))
    expected = torch.einsum("eti,eoi->eto", x, weight.dequantize(torch.float32)) + 1
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="odd number of elements"):
        ExpertWeight4bit.placeholder(2, 3, 5)
    from qlora.quant.experts import expert_weight_class
    with pytest.raises(ValueError, match="quant format 'int8' cannot quantize mixture-of-experts weights"):
        expert_weight_class("int8")


# ---- grouped_linear: the CPU twin -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_grouped_linear_forward_and_backward(dtype):
    torch.manual_seed(3)
    weight = ExpertWeight4bit.quantize(torch.randn(5, 96, 64))
    counts = torch.tensor([3, 0, 7, 1, 0])  # empty groups, a single row, a last expert with no tokens
    x = torch.randn(int(counts.sum()), 64, dtype=dtype, requires_grad=True)
    grad = torch.randn(x.shape[0], 96, dtype=dtype)
    y = grouped_linear(x, weight, counts)
    (dx,) = torch.autograd.grad(y, x, grad)

    dense = weight.dequantize(torch.float64)
    groups = torch.repeat_interleave(torch.arange(5), counts)
    x64 = x.detach().double()
    expected_y = torch.einsum("si,soi->so", x64, dense[groups])
    expected_dx = torch.einsum("so,soi->si", grad.double(), dense[groups])
    # Per element: a dot of 64 (forward) or 96 (backward) products in `dtype`; bf16 keeps 8 bits.
    eps = torch.finfo(dtype).eps
    for got, want, k in ((y, expected_y, 64), (dx, expected_dx, 96)):
        scale = (x64.abs().max() * dense.abs().max() * k ** 0.5).item() if got is y else \
            (grad.double().abs().max() * dense.abs().max() * k ** 0.5).item()
        assert (got.double() - want).abs().max().item() <= 4 * eps * scale
    assert y.dtype == dtype and dx.dtype == dtype


def test_grouped_linear_saves_no_dense_weight():
    weight = ExpertWeight4bit.quantize(torch.randn(4, 128, 128))
    x = torch.randn(10, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        grouped_linear(x, weight, torch.tensor([2, 3, 0, 5]))
    assert all(t.numel() < 128 * 128 for t in saved)


# ---- loading every family ----------------------------------------------------------------------------
def simulated_quantization(reference: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """The bf16 model with every matrix qlora quantized replaced by dequant(quant(W)), in place."""
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear):  # names under LoRA wrappers lose their ".base_layer"
                dense = reference.get_submodule(name.replace(".base_layer", "")).weight
                dense.copy_(Weight4bit.quantize(dense).dequantize(dense.dtype))
        for name, module, attr in quantized_stacks(quantized):
            dense = getattr(reference.get_submodule(name.replace(".base_layer", "")), attr)
            segments = held_experts(module, attr).segments  # gate and up quantized apart, as checkpoints hold them
            for e in range(dense.shape[0]):
                matrix = dense[e].t() if module.is_transposed else dense[e]
                simulated = torch.cat([Weight4bit.quantize(part).dequantize(dense.dtype)
                                       for part in matrix.chunk(segments)])
                dense[e].copy_(simulated.t() if module.is_transposed else simulated)
    return reference


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_with_experts_in_4bit(family, tmp_path, ids):
    path = save_tiny_moe(family, tmp_path / family)
    model = qlora.load_model(path, device="cpu", progress=False)
    stacks = quantized_stacks(model)
    experts = [m for m in model.modules() if is_experts_module(m)]
    assert experts and len(stacks) == 2 * len(experts)
    # Through transformers' experts interface, or (Llama-4) a qlora module in place of one that bmm's its stacks.
    assert model.config._experts_implementation == "qlora" or all(isinstance(m, BmmExperts) for m in experts)
    # No matrix but embeddings, the head and the small routers ([experts <= 8, hidden 64]) stays 16-bit.
    for name, param in model.named_parameters():
        if param.dtype in (torch.bfloat16, torch.float32) and param.dim() >= 2 and not name.endswith("bias"):
            assert "embed" in name or "lm_head" in name or param.numel() <= 8 * 64, name
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        bf16 = reference(ids).logits.float()
        simulated = simulated_quantization(reference, model)(ids).logits.float()
        ours = model(ids).logits.float()
    # As close to bf16 as a model whose every matrix went through dequant(quant(W)): ours differs from
    # that simulation only by bf16 rounding of differently ordered sums, far less than quantization moves it.
    gap_to_simulation = (ours - simulated).abs().max().item()
    quantization_shift = (bf16 - simulated).abs().max().item()
    assert gap_to_simulation <= 0.25 * quantization_shift + 1e-2, (gap_to_simulation, quantization_shift)
    assert torch.equal(ours.argmax(-1), simulated.argmax(-1)) or gap_to_simulation < 2e-2


def test_fused_layout_loads_the_same(tmp_path, ids):
    """A checkpoint that already holds the fused stacks (as the model names them) loads without conversion."""
    per_expert = save_tiny_moe("qwen3_moe", tmp_path / "per_expert")
    fused = tmp_path / "fused"
    fused.mkdir()
    model = build_model("qwen3_moe")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or True},
              fused / "model.safetensors", metadata={"format": "pt"})
    (fused / "config.json").write_text((per_expert / "config.json").read_text())
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(fused / "model.safetensors"))
    a = qlora.load_model(per_expert, device="cpu", progress=False)
    b = qlora.load_model(fused, device="cpu", progress=False)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_footprint_ratio_like_a_dense_model(tmp_path):
    path = save_tiny_moe("qwen3_moe", tmp_path / "moe", hidden_size=128, moe_intermediate_size=128)
    model = qlora.load_model(path, device="cpu", progress=False)
    assert_footprint_like_a_dense_model(model, build_model("qwen3_moe", hidden_size=128, moe_intermediate_size=128))


def assert_footprint_like_a_dense_model(model, dense) -> None:
    """Each expert weight goes from 16 bits to ~4.127, like a dense linear (NF4 + double quant), and
    the model saves what its experts and linears save."""
    stacks = [held_experts(m, p) for _, m, p in quantized_stacks(model)]
    expert_params = sum(s.shape.numel() for s in stacks)
    assert sum(s.nbytes for s in stacks) * 8 / expert_params == pytest.approx(4.127, rel=0.05)
    saved = qlora.memory_footprint(dense) - qlora.memory_footprint(model)
    linear_params = expert_params + sum(m.in_features * m.out_features for m in model.modules()
                                        if isinstance(m, QuantizedLinear))
    assert saved == pytest.approx(linear_params * (16 - 4.127) / 8, rel=0.05)


def test_skip_modules_keeps_experts_16bit(tmp_path, ids):
    path = save_tiny_moe("mixtral", tmp_path / "mixtral")
    model = qlora.load_model(path, device="cpu", progress=False,
                             quantization_config=qlora.QuantConfig(skip_modules=["experts"]))
    assert not quantized_stacks(model)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, simulated_quantization(reference, model)(ids).logits,
                                   rtol=0.02, atol=0.02)


# ---- bad checkpoints ----------------------------------------------------------------------------------
def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_expert_is_one_line_naming_it(tmp_path):
    path = save_tiny_moe("qwen3_moe", tmp_path / "moe")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError) as err:
        qlora.load_model(path, device="cpu", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "model.safetensors: expert 5 of model.layers.1.mlp.experts.gate_up_proj is missing" in message
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in message


def test_wrongly_shaped_expert_is_one_line_naming_it(tmp_path):
    path = save_tiny_moe("mixtral", tmp_path / "moe")
    key = "model.layers.0.block_sparse_moe.experts.2.w2.weight"  # the Hub's Mixtral names, as save_pretrained writes
    _rewrite(path, lambda t: t.__setitem__(key, t[key][:, :-8].contiguous()))
    with pytest.raises(ValueError) as err:
        qlora.load_model(path, device="cpu", progress=False)
    message = str(err.value)
    assert "\n" not in message and f"model.safetensors: {key} (expert 2 of model.layers.0.mlp.experts.down_proj)" \
        in message and "has shape [64, 56], the other experts have [64, 64]" in message


# ---- FSDP2: whole experts per rank, byte for byte ------------------------------------------------------
@pytest.mark.slow
def test_fsdp2_shards_expert_bytes_along_the_expert_dim(tmp_path):
    import json
    import subprocess
    import sys

    from test_distributed import ROOT, _env, _free_port

    model_dir = save_tiny_moe("qwen3_moe", tmp_path / "moe")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(ROOT / "tests" / "distributed_workers.py"), "gather_expert_bytes", str(tmp_path), str(model_dir)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["gathered_equal"] and result["same_logits"], rank
        assert len(result["stacks"]) == 4
        for row in result["stacks"]:
            # 8 experts over 2 ranks: 4 whole experts (rows of the packed [E, bytes] stack) each.
            assert row["local_rows"] == 4 and row["local_bytes"] == row["total_bytes"] // 2, row


# ---- peak host memory of a streaming MoE load -----------------------------------------------------------
@pytest.mark.slow
def test_peak_rss_stays_near_quantized_model_plus_one_layer_of_experts(tmp_path):
    from helpers import load_benchmark

    bench = load_benchmark("streaming_load")
    # 4 layers of 32 experts of 512x512 (gate, up, down): 50 MB of bf16 experts per layer, written per expert.
    shape = dict(hidden_size=512, moe_intermediate_size=512, intermediate_size=1024, num_experts=32,
                 num_experts_per_tok=4, num_hidden_layers=4, vocab_size=1024, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64)
    save_tiny_moe("qwen3_moe", tmp_path / "ckpt", **shape)
    result = bench.measure("qlora", tmp_path / "ckpt")
    over_baseline = result["peak_rss"] - result["baseline_rss"]
    layer_experts_bf16 = 3 * 512 * 512 * 32 * 2
    checkpoint_bytes = sum(f.stat().st_size for f in (tmp_path / "ckpt").glob("*.safetensors"))
    # Experts are converted and quantized one at a time: the quantized model plus far less than one
    # layer's experts in 16 bits (48 MB: allocator slack and the read buffers of the dense tensors).
    assert over_baseline < result["footprint"] + layer_experts_bf16 // 2 + (48 << 20), result
    assert over_baseline < 0.6 * checkpoint_bytes, (over_baseline, checkpoint_bytes)


# ---- distributed.low_memory_load: rank 0 converts and quantizes one expert at a time, ranks receive theirs -----
@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])  # per-expert tensors / fused stacks in the file
def test_low_memory_load_of_moe_gives_the_normal_loads_bytes(family, tmp_path):
    from test_distributed import build_states
    from tiny_moe import save_tiny_moe_with_tokenizer
    from tiny_run import write_copy_task

    model_dir = save_tiny_moe_with_tokenizer(tmp_path / "model", family)
    data_file = write_copy_task(tmp_path / "task.jsonl")
    streamed = build_states(model_dir, data_file, tmp_path / "streamed", "distributed.low_memory_load=true")
    # Every rank's every tensor against the normal FSDP2 load's (one family: 2 more processes, ~25 s).
    normal = build_states(model_dir, data_file, tmp_path / "normal") if family == "qwen3_moe" else []
    for rank in range(len(normal)):
        expected, got = normal[rank]["state"], streamed[rank]["state"]
        assert sorted(got) == sorted(expected)
        for key in got:  # packed expert shards, their scales, LoRA's initial values on the experts: every byte
            a, b = got[key], expected[key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), (rank, key)
    # The ranks' whole experts, side by side, are the single-process load's stacks.
    single = qlora.load_model(model_dir, device="cpu", dtype=torch.bfloat16, progress=False)
    stacks = quantized_stacks(single)
    assert len(stacks) == 4
    for name, module, attr in stacks:
        key = next(k for k in streamed[0]["state"] if k.replace(".base_layer", "") == f"base_model.model.{name}.{attr}")
        shards = [streamed[rank]["state"][key] for rank in range(2)]
        assert all(s.shape[0] == module._parameters[attr].shape[0] // 2 for s in shards)  # whole experts per rank
        assert torch.equal(torch.cat(shards), module._parameters[attr].view(torch.uint8)), name
        for field, buffer in held_state(module, attr).items():
            assert torch.equal(streamed[1]["state"][f"buffer:{key}_{field}"], buffer), (name, field)


def test_low_memory_load_names_a_missing_expert_before_sending_anything(tmp_path):
    from qlora.distributed import World
    from qlora.distributed.low_memory import _Streamer
    from qlora.errors import DamagedFileError, UnsupportedError

    path = save_tiny_moe("qwen3_moe", tmp_path / "moe")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    model = qlora.load_model(path, device="meta", progress=False)
    assert len(quantized_stacks(model)) == 4 and all(p.is_meta for p in model.parameters())
    with pytest.raises(DamagedFileError, match=r"model.safetensors: expert 5 of model.layers.1.mlp.experts.gate_up_proj"
                                               r" is missing \(no tensor model.layers.1.mlp.experts.5.up_proj.weight"):
        _Streamer(model, model.qlora_unloaded, World(), torch.device("cpu")).run()
    # A checkpoint whose experts are already 4-bit is refused there, in one line, before anything is built.
    qlora.save_model(qlora.load_model(save_tiny_moe("mixtral", tmp_path / "mixtral"), device="cpu", progress=False),
                     tmp_path / "prequantized")
    with pytest.raises(UnsupportedError, match=r"low_memory_load streams 16-bit expert stacks only, this checkpoint "
                                               r"holds model.layers.0.mlp.experts.gate_up_proj already quantized"):
        qlora.load_model(tmp_path / "prequantized", device="meta", progress=False)
