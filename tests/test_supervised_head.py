"""The loss runs the LM head on supervised positions only: the same loss and gradients as scoring
every position and masking afterwards (the oracle here, written out independently)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config
from transformers.modeling_outputs import CausalLMOutput

import qlora
from qlora.lora import attach_lora
from qlora.train.loss import head_on_positions, output_head, token_loss_sum
from helpers import rel_err
from tiny_models import VOCAB, build_model, save_tiny

FP32 = qlora.QuantConfig(compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama", dtype=torch.float32)


def adapted(model, **lora):
    torch.manual_seed(0)
    model = attach_lora(model, **{"r": 4, "lora_dropout": 0.0, "init_lora_weights": "gaussian", **lora})
    with torch.no_grad():  # non-zero B, so every adapter matrix gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.train()


def completion_batch(seed=0, length=24):
    """Right-padded rows with prompts of different lengths, one row with no supervised token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, length), generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, end) in enumerate([(5, 24), (11, 17), (2, 9), (20, 20)]):
        labels[row, prompt:end] = ids[row, prompt:end]
        mask[row, end:] = 0
        ids[row, end:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_logits_loss(model, batch):
    """Every position scored, the unsupervised ones masked out of the sum: the textbook loss."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def loss_and_grads(model, loss_fn):
    loss = loss_fn()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_loss_and_grads(model, batch):
    expected, expected_grads = loss_and_grads(model, lambda: full_logits_loss(model, batch))
    counts = []
    loss, grads = loss_and_grads(model, lambda: counts.append(token_loss_sum(model, batch)) or counts[-1][0])
    assert counts[0][1] == int((batch["labels"][:, 1:] != -100).sum())
    # fp32 sums over a few dozen positions, products of length 64 in a different blocking: ~1e-7.
    assert rel_err(loss, expected) < 1e-5
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert rel_err(grads[name], expected_grads[name]) < 1e-4, name


def test_the_head_sees_only_the_supervised_positions(checkpoint):
    model = adapted(qlora.load_model(checkpoint, FP32, progress=False))
    batch = completion_batch()
    rows = []
    handle = output_head(model).register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        loss, count = token_loss_sum(model, batch)
    finally:
        handle.remove()
    assert rows == [count] and count == 19 + 6 + 7  # rows 0-2: labels [5, 24), [11, 17), [2, 9); row 3 none
    assert torch.isfinite(loss)


def test_4bit_model_with_lora_gives_the_full_logits_loss_and_gradients(checkpoint):
    assert_same_loss_and_grads(adapted(qlora.load_model(checkpoint, FP32, progress=False)), completion_batch(1))


def test_an_adapted_head_still_only_scores_supervised_positions(checkpoint):
    model = adapted(qlora.load_model(checkpoint, FP32, progress=False), target_modules=["q_proj", "lm_head"])
    assert "lora" in type(output_head(model)).__module__ + type(output_head(model)).__name__.lower()
    assert_same_loss_and_grads(model, completion_batch(2))


def test_soft_capped_logits_go_through_the_models_own_forward():
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    assert_same_loss_and_grads(model, completion_batch(3))


def test_a_batch_without_supervised_tokens_has_zero_loss(checkpoint):
    model = adapted(qlora.load_model(checkpoint, FP32, progress=False))
    batch = completion_batch()
    batch["labels"][:] = -100
    loss, count = token_loss_sum(model, batch)
    assert count == 0 and loss.item() == 0.0
    loss.backward()  # a graph that reaches the adapter, with zero gradients


class TiedProjection(nn.Module):
    """A language model that scores with its embedding matrix through F.linear, never calling a head module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.mix = nn.Linear(32, 32)

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=F.linear(torch.tanh(self.mix(self.embed(input_ids))), self.embed.weight))


class ReshapedLogits(nn.Module):
    """A language model whose forward reshapes the head's output to [B, T, V] itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.head = nn.Linear(32, VOCAB)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        return CausalLMOutput(logits=self.head(self.embed(input_ids)).view(batch, length, -1))


def test_a_model_without_a_head_module_is_scored_at_every_position():
    model = TiedProjection()
    with head_on_positions(model, torch.ones(4, 24, dtype=torch.bool)) as selected:
        model(completion_batch()["input_ids"])
    assert selected == []
    assert_same_loss_and_grads(model, completion_batch(4))


def test_a_model_that_reshapes_its_logits_falls_back_with_a_warning():
    model = ReshapedLogits()
    with pytest.warns(UserWarning, match=r"ReshapedLogits reshapes its logits after the output head \(RuntimeError: shape .* scores every position"):
        assert_same_loss_and_grads(model, completion_batch(5))


def test_dense_model_of_another_family_matches_too():
    assert_same_loss_and_grads(build_model("qwen2").train(), completion_batch(6))


def test_a_model_that_returns_unexpected_logits_falls_back_once():
    class Padded(ReshapedLogits):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            logits = self.head(self.embed(input_ids))
            return CausalLMOutput(logits=logits if logits.dim() == 3 else torch.cat([logits, logits]))

    model = Padded()
    with pytest.warns(UserWarning, match=r"Padded reshapes its logits after the output head \(logits of shape"):
        assert_same_loss_and_grads(model, completion_batch(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second try
        assert_same_loss_and_grads(model, completion_batch(8))
