"""The preference losses against TRL's own implementations on the same log-probs (TRL is a test-only
oracle), pinned golden values (so nothing passes silently when TRL is absent), and gradients of the
whole objective (log-probs through a LoRA model, reference with the adapter off) against finite
differences in fp64."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qlora.objectives import dpo_loss, kto_kl_estimate, kto_loss, orpo_odds_ratio, simpo_loss
from qlora.objectives.losses import log1mexp

B = 6


def logps(seed: int):
    """Policy and reference summed log-probs of B pairs, and completion lengths: plausible magnitudes."""
    g = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(3, 20, (B,), generator=g)
    rejected_tokens = torch.randint(3, 20, (B,), generator=g)
    per_token = lambda n: -(torch.rand(B, generator=g, dtype=torch.float64) * 2 + 0.1) * n  # noqa: E731
    return SimpleNamespace(chosen=per_token(chosen_tokens), rejected=per_token(rejected_tokens),
                           ref_chosen=per_token(chosen_tokens), ref_rejected=per_token(rejected_tokens),
                           chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)


# ---- TRL as the oracle ----------------------------------------------------------------------------------
class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _per_token_rows(totals: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, width] per-token log-probs summing to `totals` over the first `lengths` positions, and the mask."""
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return mask * (totals / lengths)[:, None], mask


def _stub_model(log_probs: torch.Tensor):
    """What TRL's fused LM head returns, for log-probs we choose: a model call gives them back."""
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                              mean_logits=torch.zeros_like(log_probs), is_top1=torch.zeros_like(log_probs).bool())
    return lambda **kwargs: outputs


def trl_dpo(x, beta, loss_type, label_smoothing=0.0, sft_weight=0.0):
    """TRL's DPOTrainer loss (and metrics) on our log-probs, with the reference given as precomputed."""
    from trl import DPOTrainer

    width = int(max(x.chosen_tokens.max(), x.rejected_tokens.max())) + 1
    lengths = torch.cat([x.chosen_tokens, x.rejected_tokens])
    per_token, mask = _per_token_rows(torch.cat([x.chosen, x.rejected]), lengths, width)
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask], dim=1)  # position 0: prompt
    this = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type] + ["sft"] * bool(sft_weight), loss_weights=[1.0, sft_weight][
                               :1 + bool(sft_weight)], beta=beta, label_smoothing=label_smoothing,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros(2 * B, width + 1, dtype=torch.long), "attention_mask": completion_mask * 0 + 1,
              "completion_mask": completion_mask, "ref_chosen_logps": x.ref_chosen, "ref_rejected_logps": x.ref_rejected}
    loss = DPOTrainer._compute_loss(this, _stub_model(per_token), inputs, False)
    return loss, {k: v[-1] for k, v in this._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_and_metrics_equal_trl(loss_type):
    pytest.importorskip("trl")
    x = logps(1)
    for beta in (0.1, 0.5):
        ours = dpo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, beta=beta, loss_type=loss_type,
                        chosen_tokens=x.chosen_tokens, rejected_tokens=x.rejected_tokens)
        loss, metrics = trl_dpo(x, beta, loss_type)
        assert ours.losses.mean().item() == pytest.approx(loss.item(), rel=1e-12)
        assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-12)
        assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-12)
        margins = (ours.chosen_rewards - ours.rejected_rewards).mean().item()
        assert margins == pytest.approx(metrics["rewards/margins"], rel=1e-12)
        accuracy = (ours.chosen_rewards > ours.rejected_rewards).double().mean().item()
        assert accuracy == pytest.approx(metrics["rewards/accuracies"], rel=1e-7)  # TRL averages in fp32
        assert 0 < accuracy < 1  # the data hold both kinds of pair


def test_dpo_with_the_chosen_nll_equals_trl_sigmoid_plus_sft():
    """objective.sft_weight: the PreferenceObjective adds the chosen NLL per chosen token, weighted; TRL's
    loss_type=[sigmoid, sft] with loss_weights=[1, alpha] is the same sum."""
    pytest.importorskip("trl")
    from qlora.objectives import PreferenceObjective

    x = logps(7)
    loss, _ = trl_dpo(x, 0.1, "sigmoid", sft_weight=0.5)
    objective = PreferenceObjective("dpo", beta=0.1, sft_weight=0.5)
    pair = dpo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, beta=0.1)
    ours = pair.losses.mean() + objective.nll_weight * -x.chosen.sum() / x.chosen_tokens.sum()
    assert ours.item() == pytest.approx(loss.item(), rel=1e-12)


def test_dpo_label_smoothing_equals_trl_conservative_sigmoid():
    """TRL 1.16's DPOTrainer dropped cDPO from loss_type=sigmoid; its CPO trainer keeps the same formula
    on the policy-only logits, which equal DPO's when handed the log-ratios."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    x = logps(2)
    for eps in (0.0, 0.1, 0.3):
        ours = dpo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, beta=0.2, label_smoothing=eps)
        this = SimpleNamespace(alpha=0.0, accelerator=_Accelerator(), beta=0.2, loss_type="sigmoid", label_smoothing=eps)
        losses, _, _ = CPOTrainer.cpo_loss(this, x.chosen - x.ref_chosen, x.rejected - x.ref_rejected)
        torch.testing.assert_close(ours.losses, losses, rtol=1e-12, atol=0)


def test_simpo_equals_trl():
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    x = logps(3)
    chosen, rejected = x.chosen / x.chosen_tokens, x.rejected / x.rejected_tokens
    for beta, gamma, eps in ((2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.1)):
        ours = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=eps)
        this = SimpleNamespace(alpha=0.0, accelerator=_Accelerator(), beta=beta, loss_type="simpo",
                               simpo_gamma=gamma, label_smoothing=eps)
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(this, chosen, rejected)
        torch.testing.assert_close(ours.losses, losses, rtol=1e-12, atol=0)
        torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, rtol=1e-12, atol=0)
        torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, rtol=1e-12, atol=0)


def test_orpo_equals_trl():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    x = logps(4)
    # float32, as our log-probs arrive (TRL computes ORPO in float32 whatever it is given)
    chosen, rejected = (x.chosen / x.chosen_tokens).float(), (x.rejected / x.rejected_tokens).float()
    ours = orpo_odds_ratio(chosen, rejected, orpo_lambda=0.1)
    this = SimpleNamespace(beta=0.1, accelerator=_Accelerator())
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(this, chosen, rejected)
    torch.testing.assert_close(ours.losses, -losses, rtol=1e-7, atol=0)  # TRL: loss = nll - losses.mean()
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, rtol=1e-7, atol=0)
    assert ours.extra["log_odds_ratio"].mean().item() == pytest.approx(ratio.item(), rel=1e-6)
    assert ours.extra["log_odds_chosen"].mean().item() == pytest.approx(log_odds.item(), rel=1e-6)
    grid = -torch.logspace(-12, 2, 200, dtype=torch.float64)
    torch.testing.assert_close(log1mexp(grid), trl_log1mexp(grid), rtol=1e-14, atol=0)


def test_kto_equals_trl():
    pytest.importorskip("trl")
    from trl import KTOTrainer

    x = logps(5)
    policy, reference = torch.cat([x.chosen, x.rejected]), torch.cat([x.ref_chosen, x.ref_rejected])
    lengths = torch.cat([x.chosen_tokens, x.rejected_tokens])
    desirable = torch.tensor([True, False, True, True, False, False] * 2)
    g = torch.Generator().manual_seed(6)
    kl_policy = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 30
    kl_reference = kl_policy - torch.rand(2 * B, generator=g, dtype=torch.float64)  # a positive KL estimate
    width = int(lengths.max()) + 1
    per_token, mask = _per_token_rows(policy, lengths, width)
    for beta, w_desirable, w_undesirable in ((0.1, 1.0, 1.0), (0.5, 1.0, 1.33)):
        this = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(),
                               aux_loss_enabled=False, calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
                               beta=beta, desirable_weight=w_desirable, undesirable_weight=w_undesirable,
                               _compute_kl_logps=lambda model, batch: kl_policy, args=SimpleNamespace(),
                               _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
        inputs = {"input_ids": torch.zeros(2 * B, width + 1, dtype=torch.long),
                  "attention_mask": torch.ones(2 * B, width + 1, dtype=torch.long),
                  "completion_mask": torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask], dim=1),
                  "label": desirable, "ref_logps": reference, "ref_KL_logps": kl_reference}
        loss = KTOTrainer._compute_loss(this, _stub_model(per_token), inputs, False)
        kl = kto_kl_estimate(kl_policy, kl_reference)
        ours = kto_loss(policy, reference, desirable, kl, beta=beta, desirable_weight=w_desirable,
                        undesirable_weight=w_undesirable)
        assert ours.losses.mean().item() == pytest.approx(loss.item(), rel=1e-12)
        metrics = {k: v[-1] for k, v in this._metrics["train"].items()}
        assert kl.item() == pytest.approx(metrics["kl"], rel=1e-12) and kl.item() > 0
        assert ours.rewards[desirable].mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-12)
        assert ours.rewards[~desirable].mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-12)


# ---- golden values: hold without TRL ------------------------------------------------------------------------
GOLDEN_PAIR = dict(chosen_logps=torch.tensor([-12.0, -30.0, -7.5], dtype=torch.float64),
                   rejected_logps=torch.tensor([-15.0, -28.0, -7.5], dtype=torch.float64),
                   ref_chosen_logps=torch.tensor([-13.0, -29.0, -8.0], dtype=torch.float64),
                   ref_rejected_logps=torch.tensor([-14.0, -29.5, -7.0], dtype=torch.float64))
TOKENS = dict(chosen_tokens=torch.tensor([4, 10, 3]), rejected_tokens=torch.tensor([5, 8, 3]))


@pytest.mark.parametrize("loss_type, label_smoothing, expected", [
    # delta = chosen log-ratio - rejected log-ratio = [2, -2.5, 1]; beta = 0.1
    ("sigmoid", 0.0, [0.5981388693815918, 0.8259394198788436, 0.6443966600735709]),
    ("sigmoid", 0.1, [0.6181388693815918, 0.8009394198788435, 0.6543966600735709]),
    ("hinge", 0.0, [0.8, 1.25, 0.9]),
    # per-token log-ratio differences [1/4 + 1/5, -1/10 - 1.5/8, 0.5/3 + 0.5/3]; (x - 1 / (2 beta))^2
    ("ipo", 0.0, [20.7025, 27.95765625, 21.777777777777777]),
])
def test_dpo_golden_values(loss_type, label_smoothing, expected):
    terms = dpo_loss(**GOLDEN_PAIR, **TOKENS, beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing)
    torch.testing.assert_close(terms.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.chosen_rewards, torch.tensor([0.1, -0.1, 0.05], dtype=torch.float64))


def test_zero_log_ratios_give_ln2_and_zero_rewards():
    x = GOLDEN_PAIR["chosen_logps"]
    terms = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert torch.all(terms.losses == math.log(2)) and torch.all(terms.chosen_rewards == 0)


def test_orpo_simpo_kto_golden_values():
    chosen, rejected = torch.tensor([-0.5, -2.0], dtype=torch.float64), torch.tensor([-1.0, -0.25], dtype=torch.float64)
    orpo = orpo_odds_ratio(chosen, rejected, orpo_lambda=0.1)
    # log odds: log(p/(1-p)) with p = exp(logp)
    odds = lambda p: math.log(math.exp(p) / (1 - math.exp(p)))  # noqa: E731
    expected = [-0.1 * math.log(1 / (1 + math.exp(-(odds(c) - odds(r))))) for c, r in ((-0.5, -1.0), (-2.0, -0.25))]
    torch.testing.assert_close(orpo.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    simpo = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    expected = [math.log1p(math.exp(-(2.0 * (c - r) - 0.5))) for c, r in ((-0.5, -1.0), (-2.0, -0.25))]
    torch.testing.assert_close(simpo.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    kto = kto_loss(chosen, rejected, torch.tensor([True, False]), torch.tensor(0.2, dtype=torch.float64), beta=0.1,
                   desirable_weight=1.0, undesirable_weight=2.0)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = [1 - sigmoid(0.1 * (0.5 - 0.2)), 2.0 * (1 - sigmoid(0.1 * (0.2 - (-2.0 + 0.25))))]
    torch.testing.assert_close(kto.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert kto_kl_estimate(torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -2.0])).item() == 0  # clamped at 0


# ---- gradients of the whole objective, fp64, against finite differences -------------------------------------------
def tiny_lora_model():
    from peft import LoraConfig, get_peft_model
    from tiny_models import build_model

    # GPT-NeoX: its LayerNorm keeps fp64, where Llama's RMSNorm computes in fp32 and would leave the
    # finite differences at fp32 noise (1e-7 of the loss over a 1e-6 step).
    model = build_model("gpt_neox", dtype=torch.float64)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query_key_value", "dense_4h_to_h"], lora_dropout=0.0,
                        init_lora_weights=False)  # random B: the policy differs from the reference
    return get_peft_model(model, config).double()


def pair_batch():
    from qlora.data.preference import PairCollator

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(4, 120, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt_ids": ids(4), "chosen_ids": ids(3), "rejected_ids": ids(5), "example_index": 0},
                {"prompt_ids": ids(6), "chosen_ids": ids(4), "rejected_ids": ids(2), "example_index": 1}]
    return PairCollator(pad_token_id=0)(examples)


def kto_batch(seed: int = 1):
    from qlora.data.preference import UnpairedCollator

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(4, 120, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt_ids": ids(4), "completion_ids": ids(3), "kl_completion_ids": ids(5), "label": True,
                 "example_index": 0},
                {"prompt_ids": ids(5), "completion_ids": ids(4), "kl_completion_ids": ids(3), "label": False,
                 "example_index": 1}]
    return UnpairedCollator(pad_token_id=0)(examples)


@pytest.mark.parametrize("name, options", [
    ("dpo", {"loss_type": "sigmoid", "label_smoothing": 0.1}), ("dpo", {"loss_type": "ipo"}),
    ("dpo", {"loss_type": "hinge", "sft_weight": 0.5}), ("orpo", {}), ("simpo", {}), ("kto", {}),
])
def test_gradients_match_finite_differences(name, options):
    from qlora.objectives import KTOObjective, PreferenceObjective

    from qlora.objectives import completion_logps
    from qlora.data.preference import batch_view

    model = tiny_lora_model()
    model.train()
    if name == "kto":
        objective, batch = KTOObjective(beta=0.5), kto_batch(seed=2)  # a batch whose KL estimate is > 0
        # KTO's reference point z is detached by design (the paper, TRL): the analytic gradient treats it
        # as a constant, so the finite differences hold it at its value too, computed once here.
        reference = objective.reference_logps(model, batch)
        with torch.no_grad():
            z = kto_kl_estimate(completion_logps(model, batch_view(batch, "kl_"))[0], reference[:, 1])
        assert z.item() > 0  # not clamped: it enters the loss

        def loss() -> torch.Tensor:
            terms = kto_loss(completion_logps(model, batch)[0], reference[:, 0], batch["desirable"], z, beta=0.5)
            return terms.losses.mean()
    else:
        objective, batch = PreferenceObjective(name, beta=0.5, **options), pair_batch()
        totals = objective.counts(batch)

        def loss() -> torch.Tensor:
            terms = objective.loss_terms(model, batch)
            return sum(terms[k] / totals[k] for k in terms)

    params = [p for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad()
    value = loss()
    value.backward()
    assert value.item() != 0
    h = 1e-6
    g = torch.Generator().manual_seed(2)
    for param in (params[0], params[-1]):  # lora_A of the first layer, lora_B of the last
        for flat in torch.randint(0, param.numel(), (2,), generator=g).tolist():
            entry = param.data.view(-1)
            original = entry[flat].item()
            with torch.no_grad():
                entry[flat] = original + h
                up = loss().item()
                entry[flat] = original - h
                down = loss().item()
                entry[flat] = original
            numeric = (up - down) / (2 * h)
            analytic = param.grad.view(-1)[flat].item()
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, param.shape, flat)
