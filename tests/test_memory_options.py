"""Activation offload and the chunked loss: the same losses and gradients as the plain paths."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

import qlora
from qlora.lora import attach_lora
from qlora.train.loss import ChunkedLossError, check_chunked_loss, token_loss_sum
from qlora.train.offload import ActivationOffloader
from qlora.train.schema import ConfigError
from qlora.train.recipe_checks import validate
from helpers import rel_err
from tiny_models import VOCAB, save_tiny

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP32 = qlora.QuantConfig(compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama", dtype=torch.float32)


def lora_model(checkpoint, device="cpu", checkpointing=True, **lora):
    model = qlora.load_model(checkpoint, FP32, device=device, progress=False)
    torch.manual_seed(0)
    options = {"r": 4, "lora_dropout": 0.1, "init_lora_weights": "gaussian", **lora}
    model = attach_lora(model, gradient_checkpointing=checkpointing, **options)
    with torch.no_grad():  # non-zero B, so every adapter matrix gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.train()
    return model


def batch(device="cpu", length=40):
    ids = torch.randint(0, VOCAB, (2, length), device=device)
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt without loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model, inputs, context=None, **loss_options):
    torch.manual_seed(1)  # the same dropout masks in every call
    with context if context is not None else torch.enable_grad():
        loss, count = token_loss_sum(model, inputs, **loss_options)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), count, grads


# ---- activation offload -------------------------------------------------------------------------
def test_offloaded_layer_inputs_give_identical_losses_and_gradients(checkpoint):
    model = lora_model(checkpoint)
    inputs = batch()
    loss, _, grads = loss_and_grads(model, inputs)
    offloader = ActivationOffloader(model, min_bytes=0, force=True)
    offloaded_loss, _, offloaded_grads = loss_and_grads(model, inputs, offloader)
    # One host copy per decoder layer input: the embeddings' output and each layer's but the last.
    assert offloader.offloaded_count == model.config.num_hidden_layers
    assert torch.equal(offloaded_loss, loss)
    for name in grads:
        assert torch.equal(offloaded_grads[name], grads[name]), name


def test_host_chunks_are_reused_only_once_no_graph_needs_them(checkpoint):
    model = lora_model(checkpoint)
    first, second = batch(), batch()
    expected = [loss_and_grads(model, inputs) for inputs in (first, second)]
    offloader = ActivationOffloader(model, min_bytes=0, force=True)
    loss_and_grads(model, first, offloader)
    chunks = list(offloader.host_chunks.chunks)
    loss_and_grads(model, first, offloader)  # the first graph is gone: same chunks
    assert [c.data_ptr() for c in offloader.host_chunks.chunks] == [c.data_ptr() for c in chunks]
    # Two forwards before either backward: the second must not overwrite the first's copies.
    results = []
    for inputs in (first, second):
        torch.manual_seed(1)
        with offloader:
            results.append(token_loss_sum(model, inputs)[0])
    assert len(offloader.host_chunks.chunks) == 2 * len(chunks)
    for (loss, _, grads), result in zip(expected, results):
        result.backward()
        assert torch.equal(result.detach(), loss)
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert torch.equal(param.grad, grads[name]), name
        model.zero_grad(set_to_none=True)


def test_small_tensors_and_cpu_tensors_stay_put(checkpoint):
    model = lora_model(checkpoint)
    big_threshold = ActivationOffloader(model, min_bytes=1 << 30, force=True)
    loss_and_grads(model, batch(), big_threshold)
    assert big_threshold.offloaded_count == 0
    not_forced = ActivationOffloader(model, min_bytes=0)
    loss_and_grads(model, batch(), not_forced)
    assert not_forced.offloaded_count == 0  # already in host memory


def test_offload_needs_checkpointing_in_the_recipe():
    from test_recipes import compose_with

    cfg = compose_with("trainer.activation_offload=true", "trainer.gradient_checkpointing=false")
    with pytest.raises(ConfigError, match="trainer.activation_offload=true .* needs trainer.gradient_checkpointing=true"):
        validate(cfg)


# ---- chunked loss -------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 7, 1000])
def test_chunked_loss_matches_the_plain_loss_and_gradients(checkpoint, chunk_size):
    model = lora_model(checkpoint, checkpointing=False)
    inputs = batch()
    loss, count, grads = loss_and_grads(model, inputs)
    chunked, chunked_count, chunked_grads = loss_and_grads(model, inputs, chunked=True, chunk_size=chunk_size)
    assert chunked_count == count == 2 * (40 - 7)  # next-token targets: positions 7..39
    assert rel_err(chunked, loss) < 1e-6
    for name in grads:
        assert rel_err(chunked_grads[name], grads[name]) < 1e-5, name


def test_chunked_loss_on_packed_sequences(checkpoint):
    from qlora.data.collate import Collator

    model = lora_model(checkpoint, checkpointing=False)
    examples = [{"input_ids": list(range(3, 30)), "labels": list(range(3, 30)), "seq_lengths": [10, 17]},
                {"input_ids": list(range(40, 60)), "labels": [-100] * 5 + list(range(45, 60)), "seq_lengths": [20]}]
    inputs = Collator(pad_token_id=0)(examples)
    assert inputs["attention_mask"].dim() == 4  # the block-diagonal mask of packing
    loss, _, grads = loss_and_grads(model, inputs)
    chunked, _, chunked_grads = loss_and_grads(model, inputs, chunked=True, chunk_size=5)
    assert rel_err(chunked, loss) < 1e-6
    for name in grads:
        assert rel_err(chunked_grads[name], grads[name]) < 1e-5, name


def test_chunked_loss_refuses_an_adapted_head(checkpoint):
    model = lora_model(checkpoint, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ChunkedLossError, match="output head to be a plain nn.Linear, got Linear"):
        check_chunked_loss(model)


def test_chunked_loss_refuses_soft_capped_logits():
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    with pytest.raises(ChunkedLossError, match="cannot apply final_logit_softcapping=30.0"):
        check_chunked_loss(AutoModelForCausalLM.from_config(config))


# ---- CUDA ---------------------------------------------------------------------------------------
@requires_cuda
def test_gpu_offload_and_chunked_loss_match_plain_checkpointing_with_less_memory(checkpoint):
    model = lora_model(checkpoint, device="cuda")
    inputs = batch("cuda", length=60)
    loss, _, grads = loss_and_grads(model, inputs)
    offloader = ActivationOffloader(model, min_bytes=0)
    offloaded_loss, _, offloaded_grads = loss_and_grads(model, inputs, offloader, chunked=True)
    assert offloader.offloaded_count == model.config.num_hidden_layers
    assert all(chunk.is_pinned() for chunk in offloader.host_chunks.chunks)
    assert rel_err(offloaded_loss, loss) < 1e-6
    for name in grads:
        assert rel_err(offloaded_grads[name], grads[name]) < 1e-5, name
