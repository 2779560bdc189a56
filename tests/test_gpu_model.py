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
    last_split_instructions: int = 0

    @property
    def instructions(self):
        return self.outside + self.last_split_instructions + len(self.loop_lines)

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


def test_the_last_splits_sum_is_issued_once_not_by_every_program():
    # 6 programs an SM, one warp each per scheduler: the 120 instructions only the last split runs
    # add 120 cycles to the launch, not 6 x 120 as the code every program runs does.
    sms, clock = gpu_model.CARDS["H100"].sms, gpu_model.CARDS["H100"].clock_ghz * 1e3
    every = gpu_model.kernel_time(Code(stream_loop(True), blocks_per_sm=6, outside=220), "H100", 6 * sms, 4, 0, PARAMETERS)
    last = gpu_model.kernel_time(Code(stream_loop(True), blocks_per_sm=6, outside=100, last_split_instructions=120),
                                 "H100", 6 * sms, 4, 0, PARAMETERS)
    rounded = 2e-3  # the breakdown is rounded to 3 decimals
    assert every["breakdown"]["outside_us"] - last["breakdown"]["outside_us"] == pytest.approx(6 * 120 / clock, abs=rounded)
    assert every["estimate_us"] - last["estimate_us"] == pytest.approx(5 * 120 / clock)
    assert last["breakdown"]["last_split_us"] == pytest.approx(120 / clock, abs=rounded)


SPLIT_EPILOGUE_SASS = """
        /*1f80*/               @P0 ATOMG.E.ADD.STRONG.GPU PT, R9, desc[UR14][R4.64], R9 ;
        /*1f90*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*2090*/               @P0 EXIT ;
        /*20a0*/                   LDG.E.STRONG.GPU R31, desc[UR14][R6.64] ;
        /*20b0*/                   FADD R2, R2, R31 ;
        /*20c0*/              @!P1 BRA `(.L_x_5) ;
        /*20d0*/                   ATOMG.E.EXCH.STRONG.GPU PT, RZ, desc[UR14][R4.64], RZ ;
        /*2800*/                   EXIT ;
.L_x_8:
        /*2810*/                   BRA `(.L_x_8);
        /*2820*/                   NOP;
"""


def test_last_split_instructions_are_read_past_the_exit_of_the_other_splits():
    from qlora.kernels.machine_code import last_split_instructions

    assert last_split_instructions(SPLIT_EPILOGUE_SASS) == 5  # the loads, adds and counter reset to EXIT
    # Atomic adds into the output and a plain exit (gemlite's split-K): nothing runs in one split only.
    no_counter = SPLIT_EPILOGUE_SASS.replace("ATOMG.E.ADD", "RED.E.ADD")
    assert last_split_instructions(no_counter) == 0
    assert last_split_instructions(SPLIT_EPILOGUE_SASS.replace("@P0 EXIT", "    EXIT")) == 0


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
    lines = [("IADD3", "R2, P0, R2, 0x4, RZ"), ("LDG.E", "R4, desc[UR4][R2.64]"), ("LEA", "R6, P0, R4, UR8, 0x2"),
             ("LDG.E", "R8, desc[UR4][R6.64]"), ("FFMA", "R10, R8, R9, R10"), ("BRA", "`(.L_x_1)")]
    facts = gpu_model.loop_facts(Code(lines), gpu_model.CARDS["A100"])
    assert facts.streams == 1  # the second load's address comes from the first: a table lookup
    assert facts.chain_cycles >= gpu_model.LATENCY["gather"]


def test_a_gather_from_the_trip_before_is_still_a_gather():
    """The next trip's bytes loaded ahead: the lookups they index are gathers, not DRAM streams."""
    lines = [("LEA", "R6, P0, R4, UR8, 0x2"), ("LDG.E", "R8, desc[UR4][R6.64]"), ("FFMA", "R10, R8, R9, R10"),
             ("LDG.E", "R4, desc[UR4][R2.64]"), ("IADD3", "R2, P0, R2, 0x4, RZ"), ("BRA", "`(.L_x_1)")]
    facts = gpu_model.loop_facts(Code(lines), gpu_model.CARDS["H100"])
    assert facts.streams == 1 and facts.gathers == {4: 1}


def test_a_parameter_read_inside_the_loop_does_not_make_gathers():
    lines = [("LDC", "R16, c[0x0][0x254]"), ("IMAD.IADD", "R2, R2, 0x1, R16"), ("LDG.E", "R4, desc[UR4][R2.64]"),
             ("FFMA", "R10, R4, R5, R10"), ("BRA", "`(.L_x_1)")]
    facts = gpu_model.loop_facts(Code(lines), gpu_model.CARDS["H100"])
    assert facts.streams == 1 and not facts.gathers


def test_a_load_of_the_same_address_every_trip_is_an_l1_hit_not_a_stream():
    """ptxas recomputes a table's per-lane address inside the loop (lane id, parameter, multiply):
    the same line every trip, so not a DRAM stream; an address stepped by a counter is one."""
    table = [("S2R", "R3, SR_LANEID"), ("LDC.64", "R20, c[0x0][0x248]"), ("LOP3.LUT", "R3, R3, 0xf, RZ, 0xc0, !PT"),
             ("IMAD.WIDE.U32", "R20, R3, 0x4, R20"), ("LDG.E.CONSTANT", "R7, desc[UR4][R20.64]")]
    stream = [("IADD3", "R2, P0, R2, 0x10, RZ"), ("LDG.E.128", "R8, desc[UR4][R2.64]")]
    use = [("FFMA", "R30, R7, R8, R30"), ("BRA", "`(.L_x_1)")]
    facts = gpu_model.loop_facts(Code(table + stream + use), gpu_model.CARDS["H100"])
    assert facts.streams == 1 and not facts.gathers
    assert gpu_model._same_address_every_trip(table + stream + use) == {4}
    # The same table address, then overwritten by a counter-stepped one before a second load: only the first is the same every trip.
    stepped = table + [("IMAD.WIDE", "R20, R2, 0x4, R20"), ("LDG.E", "R9, desc[UR4][R20.64]")] + stream + use
    assert gpu_model._same_address_every_trip(stepped) == {4}
    # A register the loop only ever adds to (an induction variable) varies, though it reads nothing loaded.
    counter = [("VIADD", "R12, R12, 0x40"), ("IMAD.WIDE", "R14, R12, 0x4, R20"), ("LDG.E", "R9, desc[UR4][R14.64]")]
    assert gpu_model._same_address_every_trip(counter + use) == set()


def test_warp_shuffles_use_the_shared_memory_data_path():
    """32 results per SM and clock: a shuffle is a load/store-unit issue and 128 B of the L1/shared path."""
    shuffles = [("SHFL.IDX", f"PT, R{10 + i}, R4, R{40 + i}, 0x101f") for i in range(32)] + [("BRA", "`(.L_x_1)")]
    facts = gpu_model.loop_facts(Code(shuffles), gpu_model.CARDS["H100"])
    assert facts.shared_bytes == 32 * 32 * 4
    assert facts.issue_cycles == 32 / 0.25  # one warp instruction per SM and clock


def test_l1_cycles_of_a_gather_grow_with_the_lines_and_sectors_its_table_spans():
    one_line = gpu_model.gather_wavefronts(4, 64)  # 16 fp32 codes: every lane in one line
    pairs = gpu_model.gather_wavefronts(8, 2048)  # 256 8-byte entries: ~14 lines, ~25 sectors of 64
    assert one_line == 1.0
    assert pairs == pytest.approx(64 * (1 - (63 / 64) ** 32) / 4, rel=1e-9) and 6 < pairs < 6.5
    assert gpu_model.gather_wavefronts(4, None) == 8.0  # unknown: every lane its own line
    assert gpu_model.table_wavefronts(16, "coalesced") == 4.0  # 512 contiguous bytes: four lines
    mixed = gpu_model.table_wavefronts(4, [(64, 0.75), (1024, 0.25)])
    assert mixed == pytest.approx(0.75 + 0.25 * gpu_model.gather_wavefronts(4, 1024))


def test_gathers_are_charged_to_the_l1_data_path():
    gather = [("LEA", f"R{6 + 2 * i}, P0, R4, UR8, 0x3") for i in range(16)]
    lines = [("LDG.E", "R4, desc[UR4][R2.64]")] + gather + [
        ("LDG.E.64", f"R{40 + 2 * i}, desc[UR4][R{6 + 2 * i}.64]") for i in range(16)] + [("BRA", "`(.L_x_1)")]
    code = Code(lines, blocks_per_sm=8)
    small = gpu_model.kernel_time(code, "H100", 132 * 8, 100, 0, PARAMETERS, gather_tables={8: 64})
    large = gpu_model.kernel_time(code, "H100", 132 * 8, 100, 0, PARAMETERS, gather_tables={8: 2048})
    assert large["breakdown"]["l1_us"] > 5 * small["breakdown"]["l1_us"]
    assert large["breakdown"]["bound"] == "shared" and large["estimate_us"] > small["estimate_us"]


def test_fp16_accumulating_mmas_run_at_the_geforce_fp16_rate():
    def tensor_us(mnemonic):
        code = Code([(mnemonic, "R4, R8, R12, R4")] * 64 + [("BRA", "`(.L_x_1)")], blocks_per_sm=1)
        return gpu_model.kernel_time(code, "RTX 4090", 128, 100, 0, PARAMETERS)["breakdown"]["tensor_us"]
    assert tensor_us("HMMA.16816.F32") == pytest.approx(2 * tensor_us("HMMA.16816.F16"), rel=0.01)
    a100 = lambda m: gpu_model.kernel_time(Code([(m, "R4, R8, R12, R4")] * 64, blocks_per_sm=1), "A100", 108, 100, 0,  # noqa: E731
                                           PARAMETERS)["breakdown"]["tensor_us"]
    assert a100("HMMA.16816.F32.BF16") == pytest.approx(a100("HMMA.16816.F16"))


def test_published_points_are_modelled_as_the_benchmark_ran_them():
    import gemlite_kernels

    # gemlite's October 2024 AUTO mode: GEMV_REVSPLITK up to 2 rows, GEMM_SPLITK up to 32, GEMM from 16
    assert gemlite_kernels.published_candidates(1) == ("GEMV_REVSPLITK", "GEMM_SPLITK")
    assert gemlite_kernels.published_candidates(4) == ("GEMM_SPLITK",)
    assert gemlite_kernels.published_candidates(16) == ("GEMM_SPLITK", "GEMM")
    assert gemlite_kernels.published_candidates(64) == ("GEMM",)
    calibration = json.loads((ROOT / "benchmarks" / "results" / "calibration.json").read_text())
    for point in calibration["points"]:
        assert point["launch"] in gemlite_kernels.published_candidates(point["M"])


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


def test_an_arch_path_serves_every_card_of_the_arch():
    import kernels_static  # noqa: E402

    assert kernels_static.arch_cards(86) == ["A10", "RTX 3090"] and kernels_static.arch_cards(90) == ["H100"]
    # A near-tie on the table card goes to the path its sibling runs fastest ...
    a10 = {"gemv": 27.00, "fused": 27.07, "dequant_matmul": 173.9}
    rtx3090 = {"gemv": 23.13, "fused": 20.81, "dequant_matmul": 117.2}
    assert kernels_static.arch_path([a10, rtx3090]) == "fused"
    # ... but never at more than ARCH_PATH_SLACK over the table card's fastest.
    a10 = {"gemv": 27.00, "fused": 30.0}
    assert kernels_static.arch_path([a10, rtx3090]) == "gemv"
    assert kernels_static.arch_path([a10]) == "gemv"
