"""benchmarks/quality.py end to end on the tiny model: every configuration, two seeds, a few steps."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import save_tiny_model_with_tokenizer, write_copy_task

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
NAMES = ["lora16", "nf4", "fp4", "nf4_loftq"]


@pytest.mark.slow
def test_reduced_benchmark_writes_the_results_file_and_plot(tmp_path):
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "model")
    data = write_copy_task(tmp_path / "task.jsonl")
    out = tmp_path / "quality.json"
    overrides = [f"model.name_or_path={model_dir}", "model.dtype=float32", f"data.source={data}",
                 "data.format._target_=qlora.data.PromptCompletionFormat", "data.max_seq_len=32",
                 "data.eval_fraction=0.1", "trainer.max_steps=3", "trainer.micro_batch_size=4",
                 "trainer.exact_match_examples=2", "trainer.max_new_tokens=4", "lora.r=4"]
    # cwd is not the repository root: its kernels/ folder would shadow the third-party package of that name.
    result = subprocess.run([sys.executable, str(BENCH), "--seeds", "0,1", "--out", str(out),
                             "--work", str(tmp_path / "runs"), *overrides],
                            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert list(payload["configs"]) == NAMES
    for name, entry in payload["configs"].items():
        assert entry["seeds"] == [0, 1]
        losses = [row["eval_loss"] for row in entry["per_seed"]]
        assert all(math.isfinite(x) and x > 0 for x in losses)
        assert entry["eval_loss_mean"] == pytest.approx(sum(losses) / 2)
        assert entry["eval_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5)
        assert 0 <= entry["exact_match_mean"] <= 1 and entry["exact_match_std"] >= 0
        assert [step for step, _ in entry["train_loss_mean"]] == [1, 2, 3]
    # The seed changes the run (LoRA init and batch order), so the two seeds differ.
    assert payload["configs"]["nf4"]["eval_loss_std"] > 0
    loftq = payload["configs"]["nf4_loftq"]["loftq"]
    assert loftq["iterations"] == 4 and loftq["relative_error_loftq"][-1] < loftq["relative_error_plain"]
    assert set(payload["gaps"]) == {"nf4_vs_lora16_relative", "fp4_vs_lora16_relative",
                                    "nf4_loftq_vs_lora16_relative", "loftq_fraction_of_nf4_gap_closed"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "lora16" in result.stdout and "held-out loss" in result.stdout


def test_unknown_configuration_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--configs", "nf4,int3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown configuration(s) ['int3']" in result.stderr
