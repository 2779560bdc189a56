"""benchmarks/gpu_check.py: on CPU, every row it would time has the model's prediction beside it; on a
CUDA machine, the whole check runs and writes its results file within its 8-minute budget."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_every_planned_row_has_a_prediction_on_every_card():
    import gpu_check
    import gpu_model

    rows = gpu_check.planned_rows()
    assert {r["path"] for r in rows} == {"gemv", "fused", "dequant_matmul", "auto", "bf16", "bitsandbytes"}
    assert not [r for r in rows if r["path"] == "gemv" and (r["M"] > 64 or r["direction"] == "backward")]
    for card in gpu_model.CARDS:
        predicted = gpu_check.predictions(card)
        gpu_check.attach_predictions(rows, predicted)
        missing = [r for r in rows if r["model_us"] is None and r["path"] != "bitsandbytes"]
        assert not missing, (card, missing[:3])
        assert all(r["model_us"] > 0 for r in rows if r["model_us"] is not None)


def test_split_sweep_plans_every_split_once_and_scores_the_rule():
    # The split sweep times each distinct split the fused kernel runs at decode-sized M, one of
    # them the launcher's own; its regret is the rule's time over the fastest measured split.
    import gpu_check

    rows = gpu_check.planned_split_rows(90, 132)
    cases = {(r["shape"], r["M"], r["direction"]) for r in rows}
    assert len(cases) == len(gpu_check.SHAPES) * len(gpu_check.SPLIT_MS) * 2
    for case in cases:
        splits = [r["split_k"] for r in rows if (r["shape"], r["M"], r["direction"]) == case]
        assert len(splits) == len(set(splits)) > 1 and min(splits) == 1
        assert sum(r["rule"] for r in rows if (r["shape"], r["M"], r["direction"]) == case) == 1
    case = [dict(r) for r in rows if (r["shape"], r["M"], r["direction"]) == ("q_proj", 1, "forward")]
    fast = next(r["split_k"] for r in case if not r["rule"])
    for r in case:  # a made-up measurement: the rule's split 20% slower than another
        r["measured_us"] = 12.0 if r["rule"] else (10.0 if r["split_k"] == fast else 15.0)
    summary = gpu_check.split_summary(case)
    assert summary["cases"][0]["fastest_split"] == fast and summary["regret_worst"] == 1.2


def test_device_names_map_to_modelled_cards():
    import gpu_check

    assert gpu_check.card_of("NVIDIA H100 80GB HBM3", 90) == "H100"
    assert gpu_check.card_of("NVIDIA A100-SXM4-80GB", 80) == "A100"
    assert gpu_check.card_of("NVIDIA A10", 86) == "A10"
    assert gpu_check.card_of("NVIDIA GeForce RTX 4090", 89) == "RTX 4090"
    assert gpu_check.card_of("NVIDIA H200", 90) == "H100"  # not modelled: its arch's table card


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_runs_within_its_budget(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--repeats", "10", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["seconds"] < 480
    timed = [r for r in result["rows"] if r["path"] in ("fused", "bf16")]
    assert timed and all(r["measured_us"] > 0 and r["model_us"] for r in timed)
    assert set(result["refit"]["parameters"]) >= {"fixed_us", "bandwidth_fraction"}
    assert result["splits"]["regret_worst"] >= 1 and all(r["model_us"] for r in result["splits"]["rows"])
