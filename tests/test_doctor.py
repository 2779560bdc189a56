"""`qlora doctor` on a machine without a GPU: the report, the exit status, the file it writes.

The checks themselves run under the interpreter in tests/test_kernels.py
(test_interp_self_checks_pass_on_the_real_kernels); here the interpreter child is replaced by its
result, so the reporting is tested in milliseconds.
"""
import json

import pytest

from qlora import cli, doctor


def canned(failing=()):
    return {f"{path} {dtype}": {"pass": f"{path} {dtype}" not in failing, "detail": "relative error 1e-1", "ms": 3.0}
            for path in doctor.PATHS for dtype in ("float32", "float16")}


@pytest.mark.skipif(doctor.torch.cuda.is_available(), reason="the CPU report")
def test_doctor_on_cpu_reports_checks_and_predictions(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "interpreter_checks", lambda: canned())
    out = tmp_path / "doctor-cpu.json"
    assert cli.main(["doctor", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "torch: " in printed and "triton: " in printed and "PASS  gemv float16" in printed
    assert "model predictions, sm_" in printed and "all checks passed" in printed
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["environment"]["gpu"] is None and report["timings_us"] == []
    assert set(report["checks"]) == {f"{p} {d}" for p in doctor.PATHS for d in ("float32", "float16")}
    assert not list(tmp_path.glob("*.tmp"))  # staged, then renamed


def test_doctor_exits_nonzero_when_a_check_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "interpreter_checks", lambda: canned(failing=("fused float16",)))
    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report.json"
    assert cli.main(["doctor", f"out={out}"]) == 1
    assert "FAIL  fused float16" in capsys.readouterr().out
    assert json.loads(out.read_text())["failed"] == ["fused float16"]
