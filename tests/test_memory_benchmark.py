"""benchmarks/memory.py runs end to end on CPU at its smallest size, and its search finds the limit."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("memory_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_run_records_every_configuration(tmp_path):
    bench = load_bench()
    out = tmp_path / "memory.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # cwd is not the repository root: its kernels/ folder would shadow the third-party package of that name.
    result = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--size", "tiny", "--no-search",
                             "--jobs", "2", "--steps", "2", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["device_type"] == "cpu" and payload["size"] == "tiny"
    rows = {row["config"]: row for row in payload["rows"]}
    assert set(rows) == set(bench.CONFIGS)
    for name, row in rows.items():
        if name == "hf_bnb" and "skipped" in row:  # bitsandbytes not installed: skipped, with the reason
            assert row["skipped"]
            continue
        assert not row.get("error"), (name, row.get("error"))
        assert [r["seq"] for r in row["seqs"]] == payload["settings"]["seqs"], name
        for record in row["seqs"]:
            assert record["peak_rss"] > 0 and record["tokens_per_s"] > 0, (name, record)
        # A peer piece that cannot run here is replaced, and the replacement is on record.
        assert isinstance(row["build"]["substitutions"], list)
    assert len(payload["goals"]) == 3
    assert all(goal["verdict"] == "not evaluated" for goal in payload["goals"])  # not the 8B shape on a GPU
    header = next(line for line in result.stdout.splitlines() if line.startswith("config "))
    assert "optimizer" in header and "tok/s@128" in header
    table_rows = {line.split()[0] for line in result.stdout.splitlines() if line.split()}
    assert set(bench.CONFIGS) <= table_rows
    assert f"wrote {out}" in result.stdout


@pytest.mark.parametrize("guess", [300, 98_000, 100_096, 400_000])
def test_search_finds_the_longest_fitting_length(guess):
    bench = load_bench()
    limit, tried = 100_000, []

    def fits(length):
        tried.append(length)
        return length <= limit

    found = bench.search_longest(fits, guess, granularity=256)
    assert found["complete"] and found["longest"] <= limit < found["shortest_failing"]
    assert found["shortest_failing"] - found["longest"] <= max(256, 0.05 * found["longest"])
    assert [p[0] for p in found["probes"]] == tried
    if guess == 98_000:  # a prediction 2% under the limit settles in two probes
        assert len(tried) == 2


def test_search_stops_at_the_budget_and_reports_a_bound():
    bench = load_bench()
    found = bench.search_longest(lambda length: length <= 10_000, 2_048, granularity=256,
                                 can_probe=lambda length: length < 5_000)
    assert not found["complete"] and found["stopped"] == "time budget"
    assert 2_048 <= found["longest"] < 5_000 and found["shortest_failing"] is None
    assert bench.format_search(found).startswith(">=")


def test_search_when_nothing_fits():
    bench = load_bench()
    found = bench.search_longest(lambda length: False, 4_096, granularity=256)
    assert found["complete"] and found["longest"] == 0 and found["shortest_failing"] == 256


def test_predictions_from_two_lengths():
    bench = load_bench()
    # peak = 6 GiB + 100 KiB per token: a 24 GiB cap is reached at 188,743 tokens
    points = [(2048, 6 * 2**30 + 2048 * 102400), (8192, 6 * 2**30 + 8192 * 102400)]
    assert abs(bench.predict_longest(points, 24 * 2**30) - 188_743) <= 1
    # t = 1e-4 s per token + 1e-9 s per token^2
    times = [(s, 1e-4 * s + 1e-9 * s * s) for s in (2048, 8192)]
    assert bench.predict_seconds(times, 100_000) == pytest.approx(1e-4 * 1e5 + 1e-9 * 1e10)


def test_goal_verdicts_from_gpu_rows():
    bench = load_bench()
    args = SimpleNamespace(device="cuda", size="llama3-8b", seqs=[2048, 8192])
    gib = 2**30

    def row(name, peak, tokens_per_s, card=None):
        return {"config": name, "seqs": [{"seq": 2048, "oom": None, "peak_allocated": peak * gib, "peak_rss": 1,
                                          "tokens_per_s": tokens_per_s}], "searches": {"card": card} if card else {}}

    card = {"longest": 300_032, "shortest_failing": 315_136, "complete": True, "stopped": None,
            "probe_details": [{"seq": 315_136, "fits": False, "oom": "CUDA out of memory"}]}
    rows = [row("hf_bnb", 20.0, 3000), row("all_on", 9.0, 2800, card), row("all_on_unpaged", 9.5, 3000)]
    memory, context, speed = bench.goals(rows, args)
    assert memory["verdict"] == "met" and memory["ratio"] == pytest.approx(0.45)
    assert context["verdict"] == "missed" and "315136 tokens do not fit" in context["gap"]
    assert speed["verdict"] == "met" and speed["loss"] == pytest.approx(1 - 2800 / 3000)

    # A process that ended during the goal's probe leaves the goal unmeasured, and says where it ended.
    killed = {"config": "all_on", "seqs": [], "searches": {}}
    bench.salvage_searches(killed, {"cap": "card", "seq": 342_016}, "exit status -9")
    _, context, _ = bench.goals([killed], args)
    assert context["verdict"] == "not measured" and "342016" in context["gap"]
