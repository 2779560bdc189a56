"""benchmarks/quantization_quality.py on a slice of the embedded model's held-out windows: the
results file, the reference row, and its refusal of bad arguments."""
import json

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("quantization_quality")


@pytest.mark.slow
def test_a_small_run_writes_every_requested_variant_against_the_reference(bench, tmp_path, capsys):
    out = tmp_path / "quality.json"
    bench.main(["--only", "rtn_int4_g128", "gptq2_g128", "--windows", "2", "--calibration-samples", "2",
                "--out", str(out)])
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert list(results) == ["bf16", "rtn_int4_g128", "gptq2_g128"]  # the reference always runs first
    assert payload["held_out_windows"] == 2 and payload["calibration_windows"] == 2
    assert results["bf16"]["kl_vs_bf16"] == 0
    # 2 bits move the next-token distribution further from the reference than 4 bits do.
    assert 0 < results["rtn_int4_g128"]["kl_vs_bf16"] < results["gptq2_g128"]["kl_vs_bf16"]
    assert all(row["perplexity"] > 1 for row in results.values())
    printed = capsys.readouterr().out
    assert "KL vs bf16" in printed and "gptq2_g128" in printed


@pytest.mark.parametrize("argv, message", [
    (["--only", "gptq5_g128"], "unknown variant(s) gptq5_g128; choose from bf16 int8"),
    (["--windows", "-1"], "--windows >= 0"),
    (["--calibration-samples", "0"], "--calibration-samples must be >= 1"),
])
def test_bad_arguments_are_refused_in_one_line(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
