"""A machine-code performance model of the 4-bit kernels, for GPUs this project has never run on.

    python benchmarks/kernels_static.py                  # the full sweep: ~150 compiles, writes
                                                         # benchmarks/results/kernels-static.json and
                                                         # kernels/nf4/dispatch_table.json
    python benchmarks/kernels_static.py --quick          # sm_90, one shape: what CI runs
    python benchmarks/kernels_static.py --launchability  # only kernels-launchability.json: blocksize
                                                         # 32..4096 x both decodes x every M bucket x
                                                         # both products x sm_80/86/89/90 (~800 launches)
    python benchmarks/kernels_static.py --from-results benchmarks/results/kernels-static.json
                                                         # the dispatch table, goals and docs' tables (docs/kernels.md)
                                                         # again from a sweep, compiling nothing

Method. Each distinct launch configuration (arch, kernel, constexprs, warps, stages) is compiled
once through its real launcher with qlora.kernels.launch.compile_only, on a small problem that
selects the same configuration, and read back with qlora.kernels.machine_code (registers, local
memory, shared memory, the SASS of the whole kernel and of its main loop, the MMA shapes). The
model then evaluates every (shape, direction, blocksize, M) analytically from those counts and the
launch grid the launcher would use (its own config functions, so the two cannot disagree):

- bytes bound:   DRAM bytes moved / (85% of the spec bandwidth). Bytes: the packed weight and its
                 scales once per group of GROUP_M row tiles (L2 serves the group), the activations
                 and the output once, the GEMV's fp32 split-K workspace written and read back.
- issue bound:   warp instructions = programs x warps x (instructions outside the loop + loop
                 instructions x trips), over (SMs used x 4 schedulers x clock x issue efficiency);
                 issue efficiency = min(1, resident warps per scheduler / 2): a scheduler with one
                 warp stalls on every dependent instruction, two hide most of it. Resident warps
                 follow blocks_per_sm (registers, shared memory, threads) and the grid.
- tensor bound:  MMA instructions x their FLOPs (HMMA.16816 = 4096 per warp, HGMMA.64xNx16 =
                 2048 N per warpgroup) over (SMs used x the SM's tensor FLOP per clock x clock).
- launch bound:  LAUNCH_US per kernel launch (GPU-side back-to-back launch in a stream or a CUDA
                 graph, an assumption: 2-4 us is what CUDA graphs and streams typically show).
- estimate:      the largest of the four, per kernel; a path's estimate sums its kernels.
- cuBLAS:        bf16 GEMM/GEMV as max(2MNK / (70% of the dense bf16 peak), bytes / (85% of the
                 bandwidth), launch); dequant+cuBLAS = the dequantize kernel + that GEMM.
Not modelled: latency of the dependent MMA wait (the fused kernel waits on each HGMMA right after
issue), L2 misses of the GROUP_M reuse, clock throttling, wave quantisation beyond SMs used.

Architecture constants (spec sheets; 'dense' = without structured sparsity):
- sm_80 A100 SXM4 80 GB: 108 SMs, 1410 MHz boost, 2039 GB/s HBM2e, 312 TFLOP/s dense bf16
  (NVIDIA A100 datasheet; A100 whitepaper table 1).
- sm_86 A10: 72 SMs, 1695 MHz boost, 600 GB/s GDDR6, 125 TFLOP/s dense bf16 (NVIDIA A10 datasheet).
- sm_89 L4: 58 SMs, 2040 MHz boost, 300 GB/s GDDR6, 121 TFLOP/s dense bf16 (NVIDIA L4 datasheet).
- sm_90 H100 SXM5 80 GB: 132 SMs, 1830 MHz (the clock of the spec TFLOP/s), 3350 GB/s HBM3,
  989 TFLOP/s dense bf16 (NVIDIA H100 datasheet; Hopper whitepaper table 2).
- Per SM: 64K 32-bit registers (all four); shared memory per block 163/99/99/227 KB and threads
  2048/1536/1536/2048 (CUDA C Programming Guide, "Technical Specifications per Compute
  Capability"), as in qlora.kernels.machine_code. 4 warp schedulers per SM issuing 1 warp
  instruction per clock each (the Ampere/Ada/Hopper whitepapers' SM diagrams).
- Tensor FLOP per SM per clock = dense bf16 peak / (SMs x clock): 2048 (A100), 1024 (A10, L4),
  4096 (H100).
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cached_code, compile_missing, compiled_record, model_arguments, versions, write_results  # noqa: E402

ROOT = Path(__file__).parents[1]


@dataclass(frozen=True)
class Arch:
    name: str
    sms: int
    clock_ghz: float
    bandwidth_gbs: float
    bf16_tflops: float

    @property
    def tensor_flop_per_clock(self) -> float:
        return self.bf16_tflops * 1e12 / (self.sms * self.clock_ghz * 1e9)


ARCHS = {
    80: Arch("A100 SXM4", 108, 1.41, 2039, 312),
    86: Arch("A10", 72, 1.695, 600, 125),
    89: Arch("L4", 58, 2.04, 300, 121),
    90: Arch("H100 SXM5", 132, 1.83, 3350, 989),
}
SCHEDULERS = 4
BANDWIDTH_FRACTION = 0.85  # achievable DRAM bandwidth, every kernel and cuBLAS alike
CUBLAS_FLOP_FRACTION = 0.70
LAUNCH_US = 2.5
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES = (64, 128, 256, 4096)
GEMV_MAX_ROWS = 64  # gemv_4bit's own limit


# ---- compiling each distinct configuration once ----------------------------------------------------
_CODE: dict = {}


def representative(blocksize: int, per_element: bool = False):
    """A small NF4+DQ weight whose tiles take the same decode as the Llama shapes (row tiles up to
    blocksize 256), or with per_element an in_features that is no multiple of the blocksize."""
    import qlora

    in_features = max(512, blocksize) + (16 if per_element else 0)
    packed, state = qlora.quantize_4bit(torch.randn(64, in_features) * 0.05, "nf4", blocksize, True)
    return state.packed_view(packed)


def compile_key(arch: int, kernel: str, m: int, blocksize: int, transpose_weight: bool, per_element: bool = False):
    """The representative problem keeps what selects a configuration and what Triton specialises on
    (M == 1; every other size a multiple of 16, like the Llama shapes): the GEMV's rows up to its 16-row
    tile, the fused kernel's BLOCK_M bucket (16, 32, 64)."""
    if kernel == "dequantize":
        return (arch, kernel, 1, blocksize, True, per_element)
    rows = min(m, 16) if kernel == "gemv" else 16 if m <= 16 else 32 if m <= 32 else 64
    return (arch, kernel, rows, blocksize, transpose_weight, per_element)


def compile_one(key):
    """Compile one configuration: (key, constexprs, MachineCode)."""
    from qlora.kernels import launch

    arch, kernel, rows, blocksize, transpose_weight, per_element = key
    weight = representative(blocksize, per_element)
    features = weight.shape[1] if transpose_weight else weight.shape[0]
    a = torch.randn(rows, features, dtype=torch.bfloat16)
    with launch.compile_only(arch) as compiled:
        if kernel == "dequantize":
            from qlora.kernels.nf4.dequantize import dequantize_4bit_triton

            dequantize_4bit_triton(weight, torch.bfloat16)
        elif kernel == "gemv":
            from qlora.kernels.nf4.gemv import gemv_4bit

            gemv_4bit(a, weight, transpose_weight)
        else:
            from qlora.kernels.nf4.matmul import matmul_4bit_fused

            matmul_4bit_fused(a, weight, transpose_weight)
    return compiled_record(key, compiled, arch)


def machine_code_for(arch: int, kernel: str, m: int, blocksize: int, transpose_weight: bool):
    """(constexprs, MachineCode) of the main kernel `kernel` at this configuration, compiled once."""
    key = compile_key(arch, kernel, m, blocksize, transpose_weight)
    return cached_code(key, compile_one, _CODE)


# ---- the model ---------------------------------------------------------------------------------------
def weight_bytes(n: int, k: int, blocksize: int) -> float:
    blocks = n * k / blocksize
    return n * k / 2 + blocks + 4 * blocks / 256  # packed nibbles, uint8 absmax codes, fp32 nested absmax


def kernel_bounds(arch: int, code, programs: int, trips: float, bytes_moved: float) -> dict:
    """The four bounds of one launch, in microseconds, and its estimate."""
    spec = ARCHS[arch]
    used = min(spec.sms, programs)
    resident = min(code.blocks_per_sm, math.ceil(programs / spec.sms))
    efficiency = min(1.0, resident * code.num_warps / SCHEDULERS / 2)
    outside = code.instructions - code.loop_instructions
    warp_instructions = programs * code.num_warps * (outside + code.loop_instructions * trips)
    issue_us = warp_instructions / (used * SCHEDULERS * spec.clock_ghz * 1e3 * efficiency)
    mma_flops = 0.0
    for shape, count in code.mma_shapes.items():
        if shape.startswith("HGMMA"):
            n = int(shape.split(".")[1].split("x")[1])
            mma_flops += count * 2 * 64 * n * 16 * code.num_warps / 4
        elif shape.startswith("HMMA.16816"):
            mma_flops += count * 4096 * code.num_warps
        elif shape.startswith("HMMA.1688"):
            mma_flops += count * 2048 * code.num_warps
    # MMAs in the loop run every trip; the model counts the loop's share by its fraction of MMAs.
    loop_mma = sum(code.loop_opcodes.get(op, 0) for op in ("HMMA", "HGMMA"))
    all_mma = sum(code.opcodes.get(op, 0) for op in ("HMMA", "HGMMA")) or 1
    mma_flops_total = programs * mma_flops * (loop_mma / all_mma * trips + (1 - loop_mma / all_mma))
    tensor_us = mma_flops_total / (used * spec.tensor_flop_per_clock * spec.clock_ghz * 1e3)
    bytes_us = bytes_moved / (BANDWIDTH_FRACTION * spec.bandwidth_gbs * 1e3)
    return dict(bytes_bound_us=bytes_us, issue_bound_us=issue_us, tensor_bound_us=tensor_us,
                estimate_us=max(bytes_us, issue_us, tensor_us, LAUNCH_US))


def cublas_us(arch: int, m: int, n: int, k: int) -> float:
    spec = ARCHS[arch]
    flops_us = 2 * m * n * k / (CUBLAS_FLOP_FRACTION * spec.bf16_tflops * 1e6)
    bytes_us = 2 * (n * k + m * k + m * n) / (BANDWIDTH_FRACTION * spec.bandwidth_gbs * 1e3)
    return max(flops_us, bytes_us, LAUNCH_US)


def path_estimates(arch: int, m: int, n: int, k: int, blocksize: int, transpose_weight: bool, record) -> dict:
    """Estimated microseconds of each Triton path for C = A @ (W^T or W), W [n, k]; `record(row)`
    receives each kernel launch's entry."""
    from qlora.kernels.nf4.dequantize import dequantize_elements
    from qlora.kernels.nf4.gemv import gemv_block_sizes, gemv_split
    from qlora.kernels.nf4.matmul import fused_config, weight_strides

    r, cols, _, _ = weight_strides((n, k), transpose_weight)
    w4 = weight_bytes(n, k, blocksize)
    common = dict(arch=arch, M=m, N=n, K=k, blocksize=blocksize, transpose_weight=transpose_weight)

    def entry(kernel, code, bounds):
        record({**common, "kernel": kernel, "registers": code.registers, "local_bytes": code.local_bytes,
                "shared_bytes": code.shared_bytes, "shared_limit": _shared_limit(arch),
                "blocks_per_sm": code.blocks_per_sm, **{key: round(v, 3) for key, v in bounds.items()}})
        return bounds["estimate_us"]

    out = {}
    # dequantize, then cuBLAS
    _, code = machine_code_for(arch, "dequantize", 1, blocksize, True)
    elements = dequantize_elements(blocksize)
    bounds = kernel_bounds(arch, code, math.ceil(n * k / elements), 1, w4 + 2 * n * k)
    out["dequant_matmul"] = entry("dequantize", code, bounds) + cublas_us(arch, m, cols, r)
    # fused
    constexprs, code = machine_code_for(arch, "fused", m, blocksize, transpose_weight)
    config = fused_config(m, torch.bfloat16, (n, k), blocksize, transpose_weight, arch)
    tiles_m, tiles_n = math.ceil(m / config["BLOCK_M"]), math.ceil(cols / config["BLOCK_N"])
    bytes_moved = w4 * math.ceil(tiles_m / 8) + 2 * (m * r + m * cols)
    bounds = kernel_bounds(arch, code, tiles_m * tiles_n, math.ceil(r / config["BLOCK_R"]), bytes_moved)
    out["fused"] = entry("fused", code, bounds)
    # GEMV (split-K partial sums, then the reduction)
    if m <= GEMV_MAX_ROWS:
        _, code = machine_code_for(arch, "gemv", m, blocksize, transpose_weight)
        block_m, block_n, block_r, _ = gemv_block_sizes(m, (n, k), blocksize, transpose_weight)
        split_k, r_per_split = gemv_split(m, cols, r, block_n, block_r, _Device(ARCHS[arch].sms))
        programs = math.ceil(cols / block_n) * split_k * math.ceil(m / block_m)
        workspace = 4 * split_k * m * cols
        bounds = kernel_bounds(arch, code, programs, math.ceil(r_per_split / block_r),
                               w4 * math.ceil(m / block_m) + 2 * m * r + workspace)
        reduce_us = max(LAUNCH_US, (workspace + 2 * m * cols) / (BANDWIDTH_FRACTION * ARCHS[arch].bandwidth_gbs * 1e3))
        out["gemv"] = entry("gemv", code, bounds) + reduce_us
    return out


class _Device:
    """Stands in for a CUDA device in gemv_split: only its multiprocessor count is read."""

    type = "model"

    def __init__(self, sms: int):
        self.sms = sms


def _shared_limit(arch: int) -> int:
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK

    return MAX_SHARED_PER_BLOCK[arch]


# ---- the sweep ---------------------------------------------------------------------------------------
def sweep(archs, shapes, blocksizes, ms, workers: int = 1) -> tuple[list, list]:
    keys = [compile_key(arch, kernel, m, blocksize, transpose_weight) for arch in archs for blocksize in blocksizes
            for kernel in ("dequantize", "gemv", "fused") for m in ms for transpose_weight in (True, False)
            if kernel != "gemv" or m <= GEMV_MAX_ROWS]
    compile_missing(keys, workers, compile_one, _CODE)
    kernels, dispatch = [], []
    seen = set()

    def record(row):
        key = (row["arch"], row["kernel"], row["M"], row["N"], row["K"], row["blocksize"], row["transpose_weight"])
        if key not in seen:
            seen.add(key)
            kernels.append(row)

    for arch in archs:
        start = time.perf_counter()
        for name, (n, k) in shapes.items():
            for transpose_weight in (True, False):
                for blocksize in blocksizes:
                    for m in ms:
                        estimates = path_estimates(arch, m, n, k, blocksize, transpose_weight, record)
                        r, cols = (k, n) if transpose_weight else (n, k)
                        best = min(estimates, key=estimates.get)
                        dispatch.append(dict(arch=arch, shape=name, M=m, N=n, K=k, blocksize=blocksize,
                                             transpose_weight=transpose_weight,
                                             estimates={p: round(v, 3) for p, v in estimates.items()},
                                             best_path=best, best_estimate_us=round(estimates[best], 3),
                                             bf16_estimate_us=round(cublas_us(arch, m, cols, r), 3)))
        print(f"sm_{arch}: {len(_CODE)} configurations compiled so far, {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    return kernels, dispatch


def dispatch_table(dispatch: list, blocksize: int | None = None) -> dict:
    """arch -> direction -> (out_features, in_features, blocksize) -> ((largest M, path), ...): at
    every M of the sweep the path with the lowest estimate for that weight, consecutive M with the
    same path merged into one bucket. `blocksize` keeps one blocksize only."""
    table = {}
    for row in sorted(dispatch, key=lambda row: (row["arch"], not row["transpose_weight"], row["N"], row["K"],
                                                 row["blocksize"], row["M"])):
        if blocksize is not None and row["blocksize"] != blocksize:
            continue
        direction = "forward" if row["transpose_weight"] else "backward"
        buckets = table.setdefault(row["arch"], {}).setdefault(direction, {}).setdefault(
            (row["N"], row["K"], row["blocksize"]), [])
        best = min(row["estimates"], key=row["estimates"].get)
        if buckets and buckets[-1][1] == best:
            buckets[-1] = (row["M"], best)
        else:
            buckets.append((row["M"], best))
    return table


def predictions(dispatch: list, ms=(1, 16, 256, 4096), blocksize: int = 64) -> dict:
    """arch -> {"<shape> M=<m>": {"bf16": us, path: us, ...}}: forward, what `qlora doctor` prints."""
    out = {}
    for row in dispatch:
        if row["transpose_weight"] and row["blocksize"] == blocksize and row["M"] in ms:
            out.setdefault(row["arch"], {})[f"{row['shape']} M={row['M']}"] = {"bf16": row["bf16_estimate_us"],
                                                                              **row["estimates"]}
    return out


def write_dispatch_table(table: dict, path: Path, predicted: dict | None = None) -> None:
    """kernels/nf4/dispatch_table.json: the paths and, for `qlora doctor`, the forward estimates."""
    from qlora.kernels.dispatch import write_table

    write_table({"paths": table, "predictions": predicted or {}}, path)


def goals(dispatch: list, kernels: list) -> dict:
    """The model's goals for an H100, 14336x4096 NF4+DQ, blocksize 64, forward, read from the
    dispatch rows (after apply_dispatch: the path the dispatcher picks and its estimate), and the
    dispatcher's worst ratio to the fastest path over the whole sweep."""
    rows = {row["M"]: row for row in dispatch if row["arch"] == 90 and row["shape"] == "gate_proj"
            and row["blocksize"] == 64 and row["transpose_weight"]}
    if not rows:
        return {}
    out = {}
    if 1 in rows:
        out["decode_speedup_M1"] = round(rows[1]["bf16_estimate_us"] / rows[1]["estimate_us"], 3)
        out["decode_speedup_M1_goal"] = 2.5
    small = [m for m in rows if 2 <= m <= 16]
    out["worst_M2_16_bf16_over_dispatched"] = round(min(
        rows[m]["bf16_estimate_us"] / rows[m]["estimate_us"] for m in small), 3) if small else None
    dequant = [row for row in kernels if row["arch"] == 90 and row["kernel"] == "dequantize" and row["N"] == 14336
               and row["K"] == 4096 and row["blocksize"] == 64]
    if dequant:
        out["dequantize_fraction_of_bandwidth_bound"] = round(dequant[0]["bytes_bound_us"] / dequant[0]["estimate_us"], 3)
    out["dispatch_worst_ratio_to_fastest"] = round(max(row["estimate_us"] / row["best_estimate_us"] for row in rows.values()), 3)
    out["dispatch_worst_ratio_to_fastest_whole_sweep"] = round(max(row["estimate_us"] / row["best_estimate_us"]
                                                                   for row in dispatch), 3)
    return out


# The launchability sweep: every blocksize a user may quantize with, both decodes (whole-block row
# tiles where in_features % blocksize == 0 and blocksize <= 256, else per element), every M bucket
# of each kernel (the GEMV's BLOCK_M 1..16, more rows going to further programs; the fused kernel's
# BLOCK_M 16, 32, 64), both products, every arch. Past blocksize 256 both decodes are the same
# per-element code (kernels.dequantize.MAX_TILE_BLOCKSIZE), compiled once and listed under both.
LAUNCH_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
LAUNCH_ROWS = {"gemv": (1, 2, 4, 8, 16), "fused": (16, 32, 64)}


def launch_keys(archs, blocksizes=LAUNCH_BLOCKSIZES) -> list:
    """(compile key, decode label) of every launch the launchability sweep checks."""
    from qlora.kernels.nf4.dequantize import MAX_TILE_BLOCKSIZE

    out = []
    for arch, bs in itertools.product(archs, blocksizes):
        out.append(((arch, "dequantize", 1, bs, True, False), "flat"))
        for per_element, (kernel, rows), transpose_weight in itertools.product(
                (False, True), LAUNCH_ROWS.items(), (True, False)):
            for m in rows:
                key = (arch, kernel, m, bs, transpose_weight, per_element or bs > MAX_TILE_BLOCKSIZE)
                out.append((key, "per_element" if per_element else "whole_block"))
    return out


def launchability(archs, blocksizes=LAUNCH_BLOCKSIZES, workers: int = 1) -> list:
    """One row per (arch, kernel, blocksize, decode, M bucket, direction): the representative
    problem's shape and the compiled configuration's resources (the "kernels" rows' schema, less
    the bounds, which need a Llama shape)."""
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK

    keys = launch_keys(archs, blocksizes)
    compile_missing([key for key, _ in keys], workers, compile_one, _CODE)
    rows = []
    for key, decode in keys:
        arch, kernel, m, bs, transpose_weight, per_element = key
        constexprs, code = _CODE[key]
        weight_in = max(512, bs) + (16 if per_element else 0)  # representative()'s weight: [64, weight_in]
        rows.append(dict(arch=arch, kernel=kernel, M=m, N=64, K=weight_in, blocksize=bs, transpose_weight=transpose_weight,
                         decode=decode, constexprs=constexprs, num_warps=code.num_warps, registers=code.registers,
                         local_bytes=code.local_bytes, shared_bytes=code.shared_bytes,
                         shared_limit=MAX_SHARED_PER_BLOCK[arch], blocks_per_sm=code.blocks_per_sm))
    return rows


def apply_dispatch(dispatch: list) -> None:
    """Each dispatch row's `path` (what ops.choose_path picks from the table) and its estimate."""
    import importlib

    import qlora.kernels.nf4.dispatch_table
    from qlora.kernels.nf4.ops import choose_path

    importlib.reload(qlora.kernels.nf4.dispatch_table)  # the table this run may just have rewritten
    for row in dispatch:
        chosen = choose_path(row["M"], torch.bfloat16, row["arch"], row["transpose_weight"],
                             row["N"] if row["transpose_weight"] else row["K"], (row["N"], row["K"]), row["blocksize"])
        row["path"] = chosen
        row["estimate_us"] = row["estimates"][chosen]


def markdown(dispatch: list, kernels: list) -> str:
    """The tables of docs/kernels.md: per arch, the forward gate_proj (14336x4096) estimates by M, and sm_90's
    kernels at M = 1 and 4096."""
    lines = ["| arch | M | bf16 cuBLAS | GEMV | fused | dequant + cuBLAS | dispatch picks | vs bf16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in dispatch:
        if row["shape"] == "gate_proj" and row["transpose_weight"] and row["blocksize"] == 64 and row["M"] in (1, 4, 16, 64, 256, 1024, 4096):
            e = row["estimates"]
            cell = lambda p: f"{e[p]:.1f}" if p in e else "-"  # noqa: E731
            lines.append(f"| sm_{row['arch']} | {row['M']} | {row['bf16_estimate_us']:.1f} | {cell('gemv')} | {cell('fused')} | "
                         f"{cell('dequant_matmul')} | {row['path']} | {row['bf16_estimate_us'] / row['estimate_us']:.2f}x |")
    lines += ["", "| sm_90 kernel, gate_proj forward | M | registers | shared | blocks/SM | bytes us | issue us | tensor us | estimate us |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in kernels:
        if row["arch"] == 90 and row["N"] == 14336 and row["K"] == 4096 and row["transpose_weight"] and row["blocksize"] == 64 \
                and row["M"] in (1, 16, 4096):
            lines.append(f"| {row['kernel']} | {row['M']} | {row['registers']} | {row['shared_bytes'] // 1024} KB | "
                         f"{row['blocks_per_sm']} | {row['bytes_bound_us']:.1f} | {row['issue_bound_us']:.1f} | "
                         f"{row['tensor_bound_us']:.1f} | {row['estimate_us']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = model_arguments(__doc__.split("\n\n")[0], "sm_90, gate_proj, blocksize 64 only (CI)", "kernels-static.json",
                             "kernels/nf4/dispatch_table.json")
    parser.add_argument("--launchability", action="store_true",
                        help="only the launchability sweep (blocksize 32..4096, both decodes, every M bucket, "
                             "both products, every arch): benchmarks/results/kernels-launchability.json")
    args = parser.parse_args()
    if args.launchability:
        torch.manual_seed(0)
        write_launchability(tuple(ARCHS), args.workers)
        return
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
        dispatch, kernels = result["dispatch"], result["kernels"]
        if not args.no_table:
            write_dispatch_table(dispatch_table(dispatch), ROOT / "kernels" / "nf4" / "dispatch_table.json", predictions(dispatch))
        apply_dispatch(dispatch)
        result["goals_sm90_gate_proj_bs64_forward"] = goals(dispatch, kernels)
        Path(args.from_results).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["goals_sm90_gate_proj_bs64_forward"], indent=1))
        print(markdown(dispatch, kernels))
        return
    torch.manual_seed(0)
    if args.quick:
        archs, shapes, blocksizes = (90,), {"gate_proj": SHAPES["gate_proj"]}, (64,)
    else:
        archs, shapes, blocksizes = tuple(ARCHS), SHAPES, BLOCKSIZES
    kernels, dispatch = sweep(archs, shapes, blocksizes, MS, args.workers)
    table = dispatch_table(dispatch)
    if not args.quick and not args.no_table:
        write_dispatch_table(table, ROOT / "kernels" / "nf4" / "dispatch_table.json", predictions(dispatch))
    apply_dispatch(dispatch)
    result = {"method": "benchmarks/kernels_static.py docstring", "archs": {a: vars(ARCHS[a]) for a in archs},
              "versions": versions("triton"), "goals_sm90_gate_proj_bs64_forward": goals(dispatch, kernels),
              "kernels": kernels, "dispatch": dispatch}
    path = write_results("kernels-static" + ("-quick" if args.quick else ""), result,
                         path=Path(args.out) if args.out else None)
    print(json.dumps(result["goals_sm90_gate_proj_bs64_forward"], indent=1))
    print(markdown(dispatch, kernels))
    print(f"wrote {path}", file=sys.stderr)
    if not args.quick:
        write_launchability(archs, args.workers)


def write_launchability(archs, workers: int) -> None:
    launches = launchability(archs, LAUNCH_BLOCKSIZES, workers)
    defects = [row for row in launches if row["local_bytes"] or row["shared_bytes"] > row["shared_limit"]
               or row["blocks_per_sm"] < 1]
    path = write_results("kernels-launchability", {"versions": versions("triton"), "launches": launches})
    print(f"launchability: {len(launches)} launches, {len(defects)} spill or do not fit; wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
