"""benchmarks/embedded_default.py end to end on the tiny model: one round, this checkout against
itself as a peer, the table and the results file."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import overrides, save_tiny_model_with_tokenizer, write_copy_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_round_against_a_peer_writes_the_results_file(tmp_path):
    model = save_tiny_model_with_tokenizer(tmp_path / "model")
    data = write_copy_task(tmp_path / "task.jsonl")
    run = [o for o in overrides(model, data, tmp_path / "unused", **{"trainer.max_steps": 2, "trainer.save_every": 0})
           if not o.startswith("hydra.")]
    out = tmp_path / "embedded_default.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "embedded_default.py"), "--rounds", "1",
                           "--peer", f"again={sys.executable}:{ROOT}", "--out", str(out), *run],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert [row["checkout"] for row in payload["rows"]] == ["this", "again"]
    assert payload["rows"][0]["wall_vs_this"] == 1.0 and payload["rows"][1]["wall_vs_this"] > 0
    for name in ("this", "again"):
        (run_,) = payload["runs"][name]
        assert 0 < run_["train_seconds"] < run_["wall_seconds"] and run_["final_eval_loss"] > 0
    assert "wall_vs_this" in done.stdout


def test_a_bad_peer_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "embedded_default.py"), "--peer", "old=python"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["--peer 'old=python': expected NAME=PYTHON:CHECKOUT with CHECKOUT/train.py"]
