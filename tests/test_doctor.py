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
    monkeypatch.setattr(doctor, "time_cpu", lambda: {"dequantize": {"cpu path": 1.0}})
    out = tmp_path / "doctor-cpu.json"
    assert cli.main(["doctor", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "torch: " in printed and "triton: " in printed and "PASS  gemv float16" in printed
    assert "model predictions, sm_" in printed and "all checks passed" in printed
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["environment"]["gpu"] is None and report["timings_us"] == []
    assert set(report["checks"]) == {f"{p} {d}" for p in doctor.PATHS for d in ("float32", "float16")}
    assert not list(tmp_path.glob("*.tmp"))  # staged, then renamed
    cpu = report["cpu"]
    if cpu["built"]:  # a C compiler here: the CPU path's checks ran, bit-exact in every dtype
        assert "CPU path: the C kernels, built with" in printed and "PASS  cpu_dequantize bfloat16" in printed
        assert set(cpu["checks"]) == {f"{p} {d}" for p in doctor.CPU_CHECKS for d in ("float32", "bfloat16", "float16")}
    assert cpu["timings_ms"] == {"dequantize": {"cpu path": 1.0}} and "dequantize: cpu path 1.0 ms" in printed


def test_doctor_exits_nonzero_when_a_check_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "interpreter_checks", lambda: canned(failing=("fused float16",)))
    monkeypatch.setattr(doctor, "time_cpu", lambda: {})
    monkeypatch.setattr(doctor, "CPU_CHECKS", ())  # only the canned failure: the exit status is under test
    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report.json"
    assert cli.main(["doctor", f"out={out}"]) == 1
    assert "FAIL  fused float16" in capsys.readouterr().out
    assert json.loads(out.read_text())["failed"] == ["fused float16"]


@pytest.mark.slow  # ~10 s: bitsandbytes imports
def test_doctor_times_the_cpu_path_against_its_peers():
    timings = doctor.time_cpu(repeats=1, size=256, layer_size=128, rows=16)
    dequantize = timings["dequantize 256x256 nf4+dq bf16"]
    layer = timings["layer 128x128 M=16 bf16 forward+backward"]
    assert dequantize["twin"] > 0 and layer["twin"] > 0 and layer["dense F.linear"] > 0
    quantize, step = timings["quantize 128x128 nf4+dq fp32"], timings["8-bit AdamW step 0.016M fp32"]
    assert quantize["twin"] > 0 and step["twin"] > 0
    if doctor.cpu_path()["built"]:
        assert dequantize["cpu path"] > 0 and layer["cpu path"] > 0
        assert quantize["cpu path"] > 0 and step["cpu path"] > 0


def test_doctor_names_the_reference_when_forced(monkeypatch):
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    assert doctor.cpu_path()["runs"] == "the PyTorch reference (QLORA_BACKEND=torch)"
