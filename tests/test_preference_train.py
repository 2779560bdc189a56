"""Preference objectives through the real trainer on a tiny model: DPO's first step from a zero adapter
is ln 2 with zero rewards; TRL's metric names; the reference from a starting adapter; precomputed
reference log-probs kept with the checkpoints across a resume; gradient checkpointing, the NaN guard,
FSDP2, the memory plan and export."""
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from qlora.train.schema import register
from tiny_run import WORDS, overrides, save_tiny_model_with_tokenizer

ROOT = Path(__file__).resolve().parents[1]
register()
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


def write_pairs(path: Path, count: int = 48, seed: int = 0) -> Path:
    """prompt: a few words; chosen: the same words reversed; rejected: them in the prompt's order."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            words = rng.sample(WORDS, rng.randint(2, 5))
            f.write(json.dumps({"prompt": " ".join(words), "chosen": " " + " ".join(reversed(words)),
                                "rejected": " " + " ".join(words)}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return save_tiny_model_with_tokenizer(base / "model"), write_pairs(base / "pairs.jsonl")


PREFERENCE = {"data.format._target_": "qlora.data.PreferenceFormat", "objective": "dpo", "trainer.max_steps": 2,
              "trainer.save_every": 0, "trainer.eval_every": 0, "trainer.eval_samples": 0, "optimizer.lr": 3e-3}


def compose_run(assets, run_dir, **extra):
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        return compose(config_name="config", overrides=[o for o in overrides(*assets, run_dir, **{**PREFERENCE, **extra})
                                                        if not o.startswith("hydra.")])


def train(assets, run_dir, **extra) -> dict:
    from qlora.train import run

    return run(compose_run(assets, run_dir, **extra), run_dir=run_dir)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in rows if "loss" in m}


def evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "eval_loss" in line]


def test_dpo_from_a_zero_adapter_starts_at_ln2_with_zero_rewards(assets, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(assets, run_dir, **{"trainer.max_steps": 3})
    first = metrics(run_dir)[1]
    # B = 0: the policy is the reference, bit for bit, so every log-ratio is exactly 0.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    assert first["rewards/accuracies"] == 0  # TRL counts a tie as not preferring the chosen
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    later = metrics(run_dir)[3]
    assert all(name in later for name in PAIR_METRICS)
    assert later["rewards/chosen"] != 0 and later["loss"] != first["loss"]  # the policy left the reference
    final = evals(run_dir)[-1]
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(final)
    assert summary["final_eval_loss"] == final["eval_loss"]
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "reference").exists()
    # qlora eval on the run's held-out pairs: the trainer's own reward metrics, from a fresh load
    from qlora.cli import main

    assert main(["eval", f"run_dir={run_dir}", "max_new_tokens=4", "progress=false"]) == 0
    scored = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert scored["pairs"] == 5 and scored["reward"] == "dpo, beta=0.1"
    assert scored["reward_accuracy"] == pytest.approx(final["eval_rewards/accuracies"])
    assert scored["reward_margin"] == pytest.approx(final["eval_rewards/margins"], rel=1e-4, abs=1e-6)
    assert "exact_match" in scored and "loss" not in scored


def test_sft_then_dpo_uses_the_starting_adapter_as_the_reference(assets, tmp_path):
    from safetensors.torch import load_file

    sft = tmp_path / "sft"
    # SFT on the pairs' chosen answers (a PreferenceFormat source trains SFT on them); no dropout, so
    # that the starting adapter computes the same function as policy and as reference.
    train(assets, sft, objective="sft", **{"lora.dropout": 0.0})
    dpo = tmp_path / "dpo"
    train(assets, dpo, **{"model.adapter": str(sft / "adapter"), "trainer.max_steps": 2})
    first = metrics(dpo)[1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["rewards/chosen"] == 0
    assert first["logps/chosen"] != 0
    start = load_file(str(sft / "adapter" / "adapter_model.safetensors"))
    trained = load_file(str(dpo / "adapter" / "adapter_model.safetensors"))
    assert sorted(start) == sorted(trained) and not (dpo / "adapter" / "reference").exists()
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # the policy moved, from the SFT weights


def test_precomputed_reference_is_stored_with_checkpoints_and_resume_does_not_recompute(assets, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qlora.train")
    options = {"objective.precompute_reference": "true", "trainer.max_steps": 4, "trainer.save_every": 2}
    straight = tmp_path / "runs" / "straight"
    train(assets, straight, **options)
    assert "reference log-probs of 43 examples computed" in caplog.text
    stored = straight / "checkpoints" / "reference_logps.safetensors"
    assert stored.is_file()
    expected = metrics(straight)
    assert expected[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # batches padded alike: near-exact
    caplog.clear()
    resumed = tmp_path / "runs" / "resumed"
    train(assets, resumed, **{**options, "trainer.resume": str(straight / "checkpoints" / "step-000002")})
    assert "reference log-probs of 43 examples read from the run's checkpoints" in caplog.text
    assert "computed in" not in caplog.text
    got = metrics(resumed)
    assert sorted(got) == [3, 4]
    for step in got:
        assert got[step]["loss"] == expected[step]["loss"], step
        assert got[step]["rewards/margins"] == expected[step]["rewards/margins"], step


@pytest.mark.parametrize("objective, own_metric", [("orpo", "nll_loss"), ("simpo", "logps/chosen"), ("kto", "kl")])
def test_reference_free_and_unpaired_objectives_train(assets, tmp_path, objective, own_metric):
    run_dir = tmp_path / objective
    train(assets, run_dir, objective=objective)
    rows = metrics(run_dir)
    assert all(math.isfinite(rows[s]["loss"]) for s in rows) and rows[2]["loss"] != rows[1]["loss"]
    assert own_metric in rows[1] and "rewards/chosen" in rows[1] and "rewards/margins" in rows[1]
    if objective == "kto":
        assert rows[1]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) for every example
    assert "eval_loss" in evals(run_dir)[-1]


def test_memory_options_and_the_nan_guard_work_unchanged(assets, tmp_path):
    from qlora.train.trainer import NonFiniteLossError

    plain, options = tmp_path / "plain", tmp_path / "options"
    train(assets, plain)
    train(assets, options, **{"trainer.gradient_checkpointing": "true"})
    expected, got = metrics(plain), metrics(options)
    for step in (1, 2):  # the reference forward skips checkpointing (eval mode, no gradients)
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6), step
        assert got[step]["rewards/margins"] == pytest.approx(expected[step]["rewards/margins"], rel=1e-5, abs=1e-9)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+; the update was not applied"):
        train(assets, tmp_path / "nan", **{"optimizer.lr": 1.0e30, "trainer.max_grad_norm": 0,
                                           "trainer.max_steps": 20})


def test_fsdp2_losses_equal_one_process_and_the_adapter_exports(tmp_path):
    """The preference loss of a step is normalised by the step's pairs over all ranks, so two FSDP2 ranks
    give the single process's losses (the SFT tests' bound); the adapter merges like any other."""
    import test_distributed as dist

    from qlora.export import export_merged
    from qlora.train import run

    assets = (dist.save_model(tmp_path / "model"), write_pairs(tmp_path / "pairs.jsonl", count=40))
    extra = {"data.format._target_": "qlora.data.PreferenceFormat", "objective": "dpo"}
    single = tmp_path / "single" / "run"
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[o for o in dist.overrides(assets, single, 1, **extra)
                                                       if "hydra." not in o])
    run(cfg, run_dir=single)
    sharded = tmp_path / "fsdp2" / "run"
    dist.torchrun(assets, sharded, "fsdp2", **extra)
    expected, got = metrics(single), metrics(sharded)
    dist.assert_same_losses({s: m["loss"] for s, m in expected.items()}, {s: m["loss"] for s, m in got.items()},
                            range(1, dist.STEPS + 1))
    for step in got:
        assert got[step]["rewards/margins"] == pytest.approx(expected[step]["rewards/margins"], rel=1e-5, abs=1e-7)
    merged = export_merged(sharded, tmp_path / "merged", progress=False)
    assert any(Path(merged).glob("*.safetensors"))


def test_memory_plan_counts_two_sequences_and_the_reference_forward():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from distributed_plan import MODELS, plan

    measured = {"quantized": {"packed_per_weight": 0.5, "scales_per_weight": 0.03, "scales_per_layer": 1e3},
                "lora": {"lora_bytes_per_r_in_out": 4, "optimizer_bytes_per_param": 8, "grad_bytes_per_param": 4},
                "activations": {"saved_per_token_per_hidden": 20, "saved_per_token_per_intermediate": 6,
                                "backward_per_token_per_hidden": 8, "backward_per_token_per_intermediate": 4}}
    rows = {o: {r["part"]: r["no offload GB"] for r in plan(MODELS["llama3_8b"], 1, 1024, 2, 64, measured, objective=o)}
            for o in ("sft", "dpo", "orpo", "kto")}
    for part in ("activations: checkpointed / offloaded", "logits + loss", "backward of one layer (gradients, temporaries)"):
        assert rows["dpo"][part] == pytest.approx(2 * rows["sft"][part]) == pytest.approx(rows["orpo"][part])
        assert rows["kto"][part] == pytest.approx(rows["sft"][part])
    reference = "reference forward (no gradients: one layer + logits)"
    assert rows["sft"][reference] == rows["orpo"][reference] == 0
    assert rows["dpo"][reference] == pytest.approx(2 * rows["kto"][reference]) and rows["kto"][reference] > 0
    # llama3_8b, seq 1024 x 2 pairs: the reference logits alone are 4096 tokens x 128256 x 6 bytes
    assert rows["dpo"][reference] > 4096 * 128256 * 6 / 1e9
    assert rows["dpo"]["quantized base shard (packed, sharded)"] == rows["sft"]["quantized base shard (packed, sharded)"]
