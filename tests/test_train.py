"""The trainer end to end on a tiny model: artifacts, resume after a hard kill, wandb offline, NaN."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from qlora.train.schema import register
from tiny_run import overrides, save_tiny_model_with_tokenizer, write_copy_task

ROOT = Path(__file__).resolve().parents[1]
register()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return save_tiny_model_with_tokenizer(base / "model"), write_copy_task(base / "task.jsonl")


def compose_run(assets, run_dir, **extra):
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        return compose(config_name="config", overrides=[o for o in overrides(*assets, run_dir, **extra)
                                                        if not o.startswith("hydra.")])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def train_process(assets, run_dir, **extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides(*assets, run_dir, **extra)],
                            cwd=str(run_dir.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_run_writes_every_artifact(assets, tmp_path):
    from qlora.train import run

    summary = run(compose_run(assets, tmp_path / "run", **{"quantization.compute_dtype": "auto"}), run_dir=tmp_path / "run")
    run_dir = tmp_path / "run"
    assert summary["steps"] == 6 and summary["tokens"] > 0 and summary["final_eval_loss"] > 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss_curve.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-000004", "step-000006"]  # keep_last=2 of 2, 4, 6
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    assert any("samples" in m for m in read_metrics(run_dir))
    # compute_dtype=auto (the embedded default's) is recorded as the dtype the run computed in.
    from qlora.train.recipes import native_compute_dtype

    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["quantization"]["compute_dtype"]
    assert recorded == native_compute_dtype("cpu")[0]


def test_resume_after_hard_kill_matches_uninterrupted(assets, tmp_path):
    straight = tmp_path / "straight" / "run"
    straight.parent.mkdir()
    done = train_process(assets, straight, **{"trainer.max_steps": 8})
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out[-3000:]

    killed = tmp_path / "resumed" / "first"
    killed.parent.mkdir()
    proc = train_process(assets, killed, **{"trainer.max_steps": 8})
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000004" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = tmp_path / "resumed" / "second"
    proc = train_process(assets, resumed, **{"trainer.max_steps": 8, "trainer.resume": "true"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    expected, got = losses(straight), losses(resumed)
    assert min(got) >= 5 and sorted(got) == list(range(min(got), 9))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_wandb_offline_writes_run_files(assets, tmp_path, monkeypatch):
    from qlora.train import run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run_dir = tmp_path / "run"
    run(compose_run(assets, run_dir, logger="wandb", **{"trainer.max_steps": 2}), run_dir=run_dir)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    records = list(offline[0].glob("run-*.wandb"))
    assert len(records) == 1, list(offline[0].iterdir())
    # The run file (what `wandb sync` uploads) holds the resolved config and the metrics.
    content = records[0].read_bytes()
    for key in (b"micro_batch_size", b"name_or_path", b"eval_loss", b"tokens_per_s"):
        assert key in content, key


def test_nan_loss_stops_and_keeps_checkpoint(assets, tmp_path):
    from qlora.train import run
    from qlora.train.trainer import NonFiniteLossError

    run_dir = tmp_path / "run"
    cfg = compose_run(assets, run_dir, **{"optimizer.lr": 1.0e30, "trainer.max_grad_norm": 0, "trainer.max_steps": 40})
    stopped = r"(loss is (nan|inf)|the gradient norm is (nan|inf) \(loss .*\)) at step \d+; the update was not applied"
    with pytest.raises(NonFiniteLossError, match=stopped):
        run(cfg, run_dir=run_dir)
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["history"])


def test_memory_options_train_like_the_plain_loop(assets, tmp_path):
    from qlora.train import run

    # fp32 compute: the two paths sum the head's products in different orders, which bf16 activations
    # would round apart by up to 2^-8 after a few updates; in fp32 they agree to ~1e-6.
    common = {"trainer.gradient_checkpointing": "true", "trainer.max_steps": 4, "trainer.save_every": 0,
              "quantization.compute_dtype": "float32"}
    plain, options = tmp_path / "plain", tmp_path / "options"
    run(compose_run(assets, plain, **common), run_dir=plain)
    run(compose_run(assets, options, **common, **{"trainer.chunked_loss": "true", "trainer.loss_chunk_size": 8,
                                                 "trainer.activation_offload": "true"}), run_dir=options)
    expected, got = losses(plain), losses(options)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_8bit_optimizer_run_saves_8bit_states(assets, tmp_path):
    from qlora.train import run

    run_dir = tmp_path / "run"
    # min_8bit_size=0: the tiny model's adapters (4 x 64) are far below the default 4096.
    run(compose_run(assets, run_dir, optimizer="paged_adamw_8bit", **{"optimizer.min_8bit_size": 0,
                                                                        "trainer.max_steps": 4}), run_dir=run_dir)
    from qlora.train.state_io import load_state

    state = load_state(run_dir / "checkpoints" / "step-000004", "optimizer")["state"]
    assert state and all(s["exp_avg"].dtype == torch.uint8 and "exp_avg_sq_absmax" in s for s in state.values())
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(run_dir).values())


def test_the_base_score_is_remembered_for_the_next_run_of_the_same_base_and_prompts(assets, tmp_path, caplog):
    # Two greedy passes over 100 prompts dominated short runs; the one before training is the base's.
    import logging

    from qlora.train import run

    scored = {"trainer.max_steps": 1, "trainer.eval_every": 0, "trainer.exact_match_examples": 3, "trainer.max_new_tokens": 4}
    with caplog.at_level(logging.INFO, logger="qlora.train"):
        first = run(compose_run(assets, tmp_path / "first", **scored), run_dir=tmp_path / "first")
        assert "remembered from an earlier run" not in caplog.text
        second = run(compose_run(assets, tmp_path / "second", **scored), run_dir=tmp_path / "second")
    assert "remembered from an earlier run" in caplog.text
    assert second["exact_match_before"] == first["exact_match_before"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlora.train"):  # other prompts: scored again
        run(compose_run(assets, tmp_path / "third", **{**scored, "trainer.exact_match_examples": 2}),
            run_dir=tmp_path / "third")
    assert "remembered from an earlier run" not in caplog.text


def test_exact_match_is_the_same_whatever_the_generation_batch(assets):
    # trainer.generation_batch_size only groups the prompts (left-padded, masked): same answers.
    import qlora
    from transformers import AutoTokenizer

    from qlora.train.evaluation import exact_match

    model_dir, data = assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = qlora.load_model(model_dir, qlora.QuantConfig(compute_dtype=torch.float32), progress=False)
    records = [json.loads(line) for line in data.read_text().splitlines()[:7]]
    examples = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    one_by_one = exact_match(model, tokenizer, examples, 4, batch_size=1)
    assert exact_match(model, tokenizer, examples, 4, batch_size=7) == one_by_one
    assert exact_match(model, tokenizer, examples, 4, batch_size=3) == one_by_one
