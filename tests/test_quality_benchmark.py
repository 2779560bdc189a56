"""benchmarks/quality.py end to end on the tiny model (every configuration, one seed, a few steps), and\nits statistics."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import save_tiny_model_with_tokenizer, write_copy_task

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
NAMES = ["lora16", "nf4", "nf4_auto", "fp4", "nf4_loftq"]


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
    result = subprocess.run([sys.executable, str(BENCH), "--seeds", "3", "--out", str(out),
                             "--work", str(tmp_path / "runs"), *overrides],
                            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert list(payload["configs"]) == NAMES
    for name, entry in payload["configs"].items():
        assert entry["seeds"] == [3]
        (row,) = entry["per_seed"]
        assert math.isfinite(row["eval_loss"]) and row["eval_loss"] > 0 and entry["eval_loss_mean"] == row["eval_loss"]
        assert 0 <= entry["exact_match_mean"] <= 1
        assert [step for step, _ in entry["train_loss_mean"]] == [1, 2, 3]
    # The runs really differ in their base or compute dtype: no two losses are the same.
    assert len({c["eval_loss_mean"] for c in payload["configs"].values()}) == 5
    loftq = payload["configs"]["nf4_loftq"]["loftq"]
    assert loftq["iterations"] == 4 and loftq["relative_error_loftq"][-1] < loftq["relative_error_plain"]
    assert set(payload["gaps"]) == {"nf4_vs_lora16_relative", "nf4_auto_vs_lora16_relative", "fp4_vs_lora16_relative",
                                    "nf4_loftq_vs_lora16_relative",
                                    "nf4_loftq_vs_nf4_relative", "loftq_fraction_of_nf4_gap_closed"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "lora16" in result.stdout and "held-out loss" in result.stdout

    # --finished-only trains nothing: it re-reads the runs of the seeds that finished (seed 3 only).
    again = subprocess.run([sys.executable, str(BENCH), "--finished-only", "--seeds", "3,4", "--configs", "nf4,fp4",
                            "--out", str(tmp_path / "again.json"), "--work", str(tmp_path / "runs")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    reread = json.loads((tmp_path / "again.json").read_text())["configs"]
    assert list(reread) == ["nf4", "fp4"] and reread["nf4"]["seeds"] == [3]
    assert reread["nf4"]["eval_loss_mean"] == payload["configs"]["nf4"]["eval_loss_mean"]


def test_unknown_configuration_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--configs", "nf4,int3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown configuration(s) ['int3']" in result.stderr


def load_bench():
    spec = importlib.util.spec_from_file_location("quality_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH.parent))  # for its `common` import
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def test_aggregate_means_stds_and_gaps():
    bench = load_bench()
    runs = [{"eval_loss": loss, "exact_match": em, "exact_match_before": 0.0, "wall_seconds": 1.0,
             "train_loss": {1: 2.0 + i, 2: 1.0 + i}, "eval_curve": {2: loss}}
            for i, (loss, em) in enumerate([(1.0, 0.5), (1.2, 0.7), (1.4, 0.9)])]
    entry = bench.aggregate(runs, [0, 1, 2])
    assert entry["eval_loss_mean"] == pytest.approx(1.2) and entry["eval_loss_std"] == pytest.approx(0.2)
    assert entry["exact_match_mean"] == pytest.approx(0.7) and entry["exact_match_std"] == pytest.approx(0.2)
    assert entry["train_loss_mean"] == [[1, 3.0], [2, 2.0]] and entry["eval_loss_curve_mean"] == [[2, 1.2]]
    gaps = bench.gaps({"lora16": {"eval_loss_mean": 1.0}, "nf4": {"eval_loss_mean": 1.1},
                       "nf4_loftq": {"eval_loss_mean": 1.04}})
    assert gaps["nf4_vs_lora16_relative"] == pytest.approx(0.1)
    assert gaps["loftq_fraction_of_nf4_gap_closed"] == pytest.approx(0.6)
    assert gaps["nf4_loftq_vs_nf4_relative"] == pytest.approx(1.04 / 1.1 - 1)
    no_gap = bench.gaps({"lora16": {"eval_loss_mean": 1.0}, "nf4": {"eval_loss_mean": 0.98},
                         "nf4_loftq": {"eval_loss_mean": 1.05}})
    assert no_gap["loftq_fraction_of_nf4_gap_closed"] is None  # NF4 was not worse: nothing to close
