"""benchmarks/gpu_model.py: the rules of the one machine-code model, on synthetic machine code (no
compiling), and the committed results' calibration, whole-layer and flag sections."""
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_model  # noqa: E402


@dataclass
class Code:
    """The parts of qlora.kernels.machine_code.MachineCode the model reads."""

    loop_lines: list
    num_warps: int = 4
    blocks_per_sm: int = 4
    num_stages: int = 1
    outside: int = 100
    opcodes: dict = field(default_factory=dict)

    @property
    def instructions(self):
        return self.outside + len(self.loop_lines)

    @property
    def loop_instructions(self):
        return len(self.loop_lines)


def stream_loop(prefetched: bool, alu: int = 40) -> list:
    """A loop streaming one 16-byte load per thread: used right after it is issued, or issued for the
    next trip right after this trip's value is used (a full trip ahead)."""
    load = ("LDG.E.128", "R4, desc[UR4][R2.64]")
    use = ("FFMA", "R10, R4, R5, R10")
    body = [("IADD3", "R2, P0, R2, 0x10, RZ")] + [("FFMA", f"R{20 + i}, R20, R21, R{20 + i}") for i in range(alu)]
    lines = [use, load] + body if prefetched else [load, use] + body
    return lines + [("BRA", "`(.L_x_1)")]


PARAMETERS = {"bandwidth_fraction": 0.85, "fixed_us": 3.0, "latency_scale": 1.0, "tensor_efficiency": 0.8, "overlap": 0.0}


def test_busiest_sm_runs_the_extra_wave():
    code = Code(stream_loop(True), blocks_per_sm=1)
    sms = gpu_model.CARDS["H100"].sms
    one = gpu_model.kernel_time(code, "H100", sms, 10, 0, PARAMETERS)
    over = gpu_model.kernel_time(code, "H100", sms + 1, 10, 0, PARAMETERS)  # one SM runs two rounds
    assert over["breakdown"]["rounds"] == 2 and one["breakdown"]["rounds"] == 1
    compute = lambda t: t["estimate_us"] - PARAMETERS["fixed_us"]  # noqa: E731
    assert compute(over) == pytest.approx(2 * compute(one))


def test_prefetch_distance_read_from_the_loop_bounds_latency():
    late = gpu_model.loop_facts(Code(stream_loop(False)), gpu_model.CARDS["H100"])
    early = gpu_model.loop_facts(Code(stream_loop(True)), gpu_model.CARDS["H100"])
    assert late.stream_distance < 0.05 and early.stream_distance > 0.95  # used at once / one trip ahead
    # A 600-instruction trip (one warp per scheduler) covers the ~480-cycle DRAM latency when its load is
    # issued a trip ahead; used at once, the warp waits the whole latency every trip.
    slow = gpu_model.kernel_time(Code(stream_loop(False, 600)), "H100", 132, 100, 0, PARAMETERS)
    fast = gpu_model.kernel_time(Code(stream_loop(True, 600)), "H100", 132, 100, 0, PARAMETERS)
    assert fast["breakdown"]["latency_us"] == 0 and fast["breakdown"]["bound"] == "issue"
    assert slow["breakdown"]["latency_us"] > 0 and slow["estimate_us"] > 1.6 * fast["estimate_us"] - PARAMETERS["fixed_us"]


def test_gathers_sit_in_the_chain_not_in_the_streams():
    lines = [("LDG.E", "R4, desc[UR4][R2.64]"), ("LEA", "R6, P0, R4, UR8, 0x2"),
             ("LDG.E", "R8, desc[UR4][R6.64]"), ("FFMA", "R10, R8, R9, R10"), ("BRA", "`(.L_x_1)")]
    facts = gpu_model.loop_facts(Code(lines), gpu_model.CARDS["A100"])
    assert facts.streams == 1  # the second load's address comes from the first: a table lookup
    assert facts.chain_cycles >= gpu_model.LATENCY["gather"]


def test_integer_ops_issue_at_half_rate():
    ints = gpu_model.loop_facts(Code([("LOP3.LUT", f"R{i}, R1, 0xf, RZ, 0xc0, !PT") for i in range(2, 66)]),
                                gpu_model.CARDS["H100"])
    floats = gpu_model.loop_facts(Code([("FMUL", f"R{i}, R1, R1") for i in range(2, 66)]), gpu_model.CARDS["H100"])
    assert ints.issue_cycles == pytest.approx(2 * floats.issue_cycles)


def test_fixed_cost_and_tensor_derate_are_the_same_for_cublas():
    p = dict(PARAMETERS)
    small = gpu_model.cublas_time("H100", 1, 4096, 4096, p)
    assert small["estimate_us"] == pytest.approx(small["breakdown"]["dram_us"] + p["fixed_us"], abs=1e-2)
    big = gpu_model.cublas_time("H100", 4096, 4096, 4096, p)
    peak_us = 2 * 4096**3 / (gpu_model.CARDS["H100"].tensor_tflops * 1e6)
    assert big["breakdown"]["tensor_us"] >= peak_us / p["tensor_efficiency"]


def test_cards_as_named():
    assert set(gpu_model.CARDS) == {"A100", "H100", "L4", "A10", "RTX 3090", "RTX 4090"}
    # GeForce cards: half the fp32-accumulate tensor rate per SM of their datacenter siblings
    assert gpu_model.CARDS["RTX 3090"].tensor_flop_per_clock == pytest.approx(gpu_model.CARDS["A10"].tensor_flop_per_clock / 2, rel=0.02)
    assert gpu_model.CARDS["RTX 4090"].tensor_flop_per_clock == pytest.approx(gpu_model.CARDS["L4"].tensor_flop_per_clock / 2, rel=0.02)


def test_committed_results_carry_calibration_layers_and_flags():
    result = json.loads((ROOT / "benchmarks" / "results" / "kernels-static.json").read_text())
    calibration = result["calibration"]
    points = calibration["points"]
    assert points and {p["card"] for p in points} == {"H100", "A100", "RTX 4090", "RTX 3090"}
    assert {True, False} == {p["held_out"] for p in points} and all(p["source"] for p in points)
    held = sorted(abs(p["model_us"] - p["published_us"]) / p["published_us"] for p in points if p["held_out"])
    assert calibration["held_out_worst_abs_error"] == pytest.approx(held[-1], abs=2e-3)
    assert calibration["parameters"] == result["parameters"]
    layers = result["layers"]
    assert {r["card"] for r in layers} == set(gpu_model.CARDS)
    assert {r["model"] for r in layers} == {"llama3_8b", "llama3_70b"}
    assert {r["direction"] for r in layers} == {"forward", "backward"}
    for r in layers:
        assert r["qlora_us"] > 0 and r["bf16_us"] > 0 and len(r["paths"]) == 7
    assert isinstance(result["flagged"], list)
    for flag in result["flagged"]:
        assert flag["model_speedup"] > flag["published_speedup"] and flag["path"] != "dequant_matmul"
