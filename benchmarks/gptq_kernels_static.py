"""The GPTQ Triton kernels (kernels/gptq/triton.py) in the machine-code performance model of
benchmarks/kernels_static.py, for GPUs this project has never run on.

    python benchmarks/gptq_kernels_static.py --workers 2   # the full sweep: 160 compiles (3-4 min), writes
                                                           # benchmarks/results/gptq-kernels-static.json
                                                           # and kernels/gptq/dispatch_table.json
    python benchmarks/gptq_kernels_static.py --quick       # sm_90, gate_proj, 4 bits only
    python benchmarks/gptq_kernels_static.py --from-results benchmarks/results/gptq-kernels-static.json

Method: benchmarks/gpu_model.py's, the one model of every kernel family (read its docstring), through
kernels_static.py's helpers: the table cards per arch (TABLE_CARDS: A100, A10, L4, H100), the
Llama-3-8B projections (SHAPES), the M sweep (MS), one launch's time (kernel_bounds: busiest-SM
rounds, per-unit issue, shared memory, tensor cores, dependency chain, DRAM latency by prefetch
distance, DRAM bandwidth, fixed cost) and cuBLAS bf16 (cublas_us), with the calibrated parameters.
What is GPTQ's own:

- Compiling. Each distinct launch configuration (arch, kernel, bits, direction, M bucket) is
  compiled once through its real launcher under qlora.kernels.launch.compile_only, on a 4096 x 4096
  weight of that width (random words, g_idx = k // 128): the kernels specialise on no shape, so its
  code is the code of every Llama projection, and the split of the GEMV gives its loop several trips.
  The group size is a run-time value (g_idx) and changes bytes only, not code.
- Bytes. The packed weight K*N*bits/8, its fp16 scales and packed zeros per group, g_idx (4 K); the
  activations and the output once (consecutive programs of the fused kernels share one weight tile
  across M tiles: grid axis 0 is M, so the weight is charged once); the dense bf16 W written by the
  dequantize kernel; the GEMV's fp32 split-K workspace written and read back by its reduction.
- Paths. dequant_matmul = the dequantize kernel + cuBLAS bf16 on the dense W; fused = the forward
  (X W^T) or backward (dY W) kernel; gemv = the forward decode GEMV (2/4/8 bits) + its reduction,
  the reduction at its bytes plus the fixed per-kernel cost. The GEMV reads g_idx once per program to check that no
  packed word straddles two groups, then runs its fast loop; that check and the per-value fallback
  loop (never taken for these weights) are counted once, as code outside the main loop.
- Dispatch. Per arch, direction, bits and weight shape, the fastest path at group size 128 per M
  bucket: kernels/gptq/dispatch_table.json, read by qlora.kernels.gptq.ops.choose_path (a shape not
  modelled takes the nearest modelled one's entry).
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cached_code, compile_missing, compiled_record, model_arguments, versions, write_results  # noqa: E402
import gpu_model  # noqa: E402
from kernels_static import ARCHS, MS, SHAPES, TABLE_CARDS, cublas_us, disk_cache, kernel_bounds  # noqa: E402

ROOT = Path(__file__).parents[1]
BITS = (2, 3, 4, 8)
GROUP_SIZES = (128, -1)
TABLE_GROUP_SIZE = 128
DIRECTIONS = (("forward", True), ("backward", False))

_CODE: dict = {}


# The GPTQ kernels' gathers read rows of scales, zeros (and act-order weights) picked by g_idx, across
# consecutive lanes: charged like coalesced loads (gpu_model.table_wavefronts), not table lookups.
GATHERS = {4: "coalesced", 8: "coalesced", 16: "coalesced"}


# ---- compiling each distinct configuration once ----------------------------------------------------

def representative(bits: int, features: int = 4096, group_size: int = 128):
    """A held GPTQ weight [features, features] of random codes: what the kernels compile against."""
    from qlora.kernels.gptq.format import PackedGPTQ, packed_words

    n = k = features
    generator = torch.Generator().manual_seed(bits)
    words = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=generator)  # noqa: E731
    groups = k // group_size
    return PackedGPTQ(words(packed_words(k, bits), n), words(groups, packed_words(n, bits)),
                      torch.rand(groups, n, dtype=torch.float16, generator=generator) * 0.01,
                      (torch.arange(k) // group_size).to(torch.int32), None, bits, 1, (n, k))


def m_bucket(kernel: str, m: int) -> int:
    """The rows that select the kernel's configuration: the fused kernels' BLOCK_M (16, 32, 64),
    the GEMV's BLOCK_M (1, 2, 4, 8)."""
    from qlora.kernels.gptq.triton import GEMV_BLOCK_M, _block_m

    if kernel == "dequantize":
        return 1
    if kernel == "gemv":
        return min(GEMV_BLOCK_M, 1 << (max(m, 1) - 1).bit_length())
    return _block_m(m)


def compile_key(arch: int, kernel: str, bits: int, m: int, transpose_weight: bool):
    return (arch, kernel, bits, m_bucket(kernel, m), transpose_weight if kernel == "fused" else True)


def compile_one(key):
    """(key, constexprs, MachineCode) of the main kernel of one configuration."""
    from qlora.kernels.gptq import triton as gptq_triton
    from qlora.kernels import launch

    arch, kernel, bits, rows, transpose_weight = key
    weight = representative(bits)
    n, k = weight.shape
    a = torch.randn(rows, k if transpose_weight else n, dtype=torch.bfloat16)
    with launch.compile_only(arch) as compiled:
        if kernel == "dequantize":
            gptq_triton.dequantize_gptq_triton(weight, torch.bfloat16)
        elif kernel == "gemv":
            gptq_triton.gemv_gptq(a, weight, None)
        elif transpose_weight:
            gptq_triton.matmul_gptq_forward(a, weight, None)
        else:
            gptq_triton.matmul_gptq_backward(a, weight)
    return compiled_record(key, compiled, arch)


def code_for(arch: int, kernel: str, bits: int, m: int, transpose_weight: bool):
    key = compile_key(arch, kernel, bits, m, transpose_weight)
    return cached_code(key, compile_one, _CODE)


# ---- the model ---------------------------------------------------------------------------------------
def weight_bytes(n: int, k: int, bits: int, group_size: int) -> float:
    groups = math.ceil(k / (k if group_size == -1 else group_size))
    return k * n * bits / 8 + groups * n * 2 + groups * n * bits / 8 + 4 * k  # codes, scales, zeros, g_idx


def path_estimates(arch: int, m: int, n: int, k: int, bits: int, group_size: int, transpose_weight: bool,
                   record) -> dict:
    """Estimated microseconds of each Triton path for Y = X W^T (forward) or dX = dY W (backward),
    W [n, k]; `record(row)` receives each kernel launch's entry."""
    from qlora.kernels.gptq.triton import GEMV_BITS, MULTIPROCESSORS, gemv_config

    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK

    reduction, cols = (k, n) if transpose_weight else (n, k)
    packed = weight_bytes(n, k, bits, group_size)
    card = TABLE_CARDS[arch]
    common = dict(arch=arch, card=card, M=m, N=n, K=k, bits=bits, group_size=group_size, transpose_weight=transpose_weight)

    def entry(kernel, code, bounds):
        record({**common, "kernel": kernel, "registers": code.registers, "local_bytes": code.local_bytes,
                "shared_bytes": code.shared_bytes, "shared_limit": MAX_SHARED_PER_BLOCK[arch],
                "blocks_per_sm": code.blocks_per_sm, **{key: round(v, 3) if isinstance(v, float) else v
                                                        for key, v in bounds.items()}})
        return bounds["estimate_us"]

    out = {}
    constexprs, code = code_for(arch, "dequantize", bits, 1, True)
    programs = math.ceil(k / constexprs["BLOCK_K"]) * math.ceil(n / constexprs["BLOCK_N"])
    bounds = kernel_bounds(card, code, programs, 1, packed + 2 * n * k, GATHERS)
    out["dequant_matmul"] = entry("dequantize", code, bounds) + cublas_us(card, m, cols, reduction)

    constexprs, code = code_for(arch, "fused", bits, m, transpose_weight)
    block_m = constexprs["BLOCK_M"]
    block_cols, block_reduction = ((constexprs["BLOCK_N"], constexprs["BLOCK_K"]) if transpose_weight
                                   else (constexprs["BLOCK_K"], constexprs["BLOCK_N"]))
    programs = math.ceil(m / block_m) * math.ceil(cols / block_cols)
    bounds = kernel_bounds(card, code, programs, math.ceil(reduction / block_reduction),
                           packed + 2 * (m * reduction + m * cols), GATHERS)
    out["fused"] = entry("fused", code, bounds)

    if transpose_weight and bits in GEMV_BITS:
        constexprs, code = code_for(arch, "gemv", bits, m, True)
        config = gemv_config(m, n, k, bits, MULTIPROCESSORS[arch])
        tiles_m = math.ceil(m / config["BLOCK_M"])
        programs = math.ceil(n / config["BLOCK_N"]) * config["SPLIT_K"] * tiles_m
        workspace = 4 * config["SPLIT_K"] * m * n
        bounds = kernel_bounds(card, code, programs, math.ceil(config["WORDS_PER_SPLIT"] / config["BLOCK_W"]),
                               packed * tiles_m + 2 * m * k + workspace, GATHERS)
        out["gemv"] = entry("gemv", code, bounds) + gpu_model.bandwidth_us(card, workspace + 2 * m * n)
    return out


# ---- the sweep ---------------------------------------------------------------------------------------
def sweep(archs, shapes, bits_list, group_sizes, ms, workers: int = 1) -> tuple[list, list]:
    from qlora.kernels.gptq.triton import GEMV_BITS

    keys = [compile_key(arch, kernel, bits, m, transpose_weight) for arch in archs for bits in bits_list
            for kernel in ("dequantize", "fused", "gemv") for m in ms for _, transpose_weight in DIRECTIONS
            if kernel != "gemv" or (bits in GEMV_BITS and transpose_weight)]
    compile_missing(keys, workers, compile_one, _CODE)
    kernels, dispatch, seen = [], [], set()

    def record(row):
        key = tuple(row[f] for f in ("arch", "kernel", "M", "N", "K", "bits", "group_size", "transpose_weight"))
        if key not in seen:
            seen.add(key)
            kernels.append(row)

    for arch in archs:
        for (name, (n, k)), (_, transpose_weight), bits, group_size, m in itertools.product(
                shapes.items(), DIRECTIONS, bits_list, group_sizes, ms):
            estimates = path_estimates(arch, m, n, k, bits, group_size, transpose_weight, record)
            reduction, cols = (k, n) if transpose_weight else (n, k)
            best = min(estimates, key=estimates.get)
            dispatch.append(dict(arch=arch, shape=name, M=m, N=n, K=k, bits=bits, group_size=group_size,
                                 transpose_weight=transpose_weight,
                                 estimates={p: round(v, 3) for p, v in estimates.items()},
                                 best_path=best, best_estimate_us=round(estimates[best], 3),
                                 bf16_estimate_us=round(cublas_us(TABLE_CARDS[arch], m, cols, reduction), 3)))
    return kernels, dispatch


def dispatch_table(dispatch: list, group_size: int = TABLE_GROUP_SIZE) -> dict:
    """arch -> direction -> bits -> weight shape (out, in) -> ((largest M, path), ...): per M of the
    sweep, the path the model finds fastest for that projection at group size `group_size`. Keyed by
    shape, not by output width alone: at M = 16-64 (sm_90, 4 bits, forward) the fused kernel beats
    dequant+cuBLAS by 2.4x on gate_proj and loses by 1.7x on q_proj, both wide outputs."""
    table = {}
    for row in sorted(dispatch, key=lambda r: (r["arch"], not r["transpose_weight"], r["bits"], r["N"], r["K"], r["M"])):
        if row["group_size"] != group_size:
            continue
        direction = "forward" if row["transpose_weight"] else "backward"
        buckets = (table.setdefault(row["arch"], {}).setdefault(direction, {}).setdefault(row["bits"], {})
                   .setdefault((row["N"], row["K"]), []))
        buckets.append((row["M"], row["best_path"]))
    return table


def write_dispatch_table(table: dict, path: Path) -> None:
    """kernels/gptq/dispatch_table.json."""
    from qlora.kernels.dispatch import write_table

    write_table({"paths": table}, path)


def apply_dispatch(dispatch: list, table: dict) -> None:
    """Each row's `path` (what gptq_ops.choose_path picks in bf16 from `table`) and its estimate."""
    from qlora.kernels.gptq.ops import choose_path

    for row in dispatch:
        row["path"] = choose_path(row["M"], torch.bfloat16, row["arch"], row["transpose_weight"], row["bits"],
                                  (row["N"], row["K"]), table)
        row["estimate_us"] = row["estimates"][row["path"]]


def goals(dispatch: list) -> dict:
    """decode: 4-bit g128 gate_proj (14336 x 4096) forward at M=1 on the H100, bf16 cuBLAS over the
    dispatched path, beside the best published hand-written CUDA int4 kernel at M=1 on the H100
    (Marlin / tinygemm, benchmarks/results/published-kernels.json): a modelled speed-up above it is a
    model error, flagged; training: M >= 512, both directions, every arch, shape, width and group
    size, the dispatched path over dequant+cuBLAS (goal <= 1)."""
    out = {}
    decode = [row for row in dispatch if row["arch"] == 90 and row["shape"] == "gate_proj" and row["bits"] == 4
              and row["group_size"] == 128 and row["transpose_weight"] and row["M"] == 1]
    if decode:
        row = decode[0]
        bar = max(p["speedup"] for p in json.loads((ROOT / "benchmarks" / "results" / "published-kernels.json")
                                                   .read_text())["points"]
                  if p["card"] == "H100" and p["M"] == 1 and p["kernel"] in ("marlin", "torchao_tinygemm"))
        speedup = round(row["bf16_estimate_us"] / row["estimate_us"], 2)
        out["decode_sm90_gate_proj_4bit_g128_M1"] = dict(
            path=row["path"], estimate_us=row["estimate_us"], bf16_us=row["bf16_estimate_us"],
            speedup_over_bf16=speedup, best_published_cuda_speedup=bar, flagged_above_cuda=speedup > bar)
    training = [row for row in dispatch if row["M"] >= 512]
    if training:
        worst = max(training, key=lambda row: row["estimate_us"] / row["estimates"]["dequant_matmul"])
        fused = max(training, key=lambda row: row["estimates"]["fused"] / row["estimates"]["dequant_matmul"])
        out["training_M512_up"] = dict(
            worst_dispatched_over_dequant_cublas=round(worst["estimate_us"] / worst["estimates"]["dequant_matmul"], 3),
            goal=1.0, worst_fused_over_dequant_cublas=round(fused["estimates"]["fused"] / fused["estimates"]["dequant_matmul"], 3),
            worst_fused_at={f: fused[f] for f in ("arch", "shape", "M", "bits", "group_size", "transpose_weight")})
    return out


def markdown(dispatch: list) -> str:
    """The table of docs/kernels.md (model estimates, labelled there with the calibration error):
    gate_proj (14336 x 4096), group size 128; sm_90 4 bits by M in both
    directions, sm_90 2/3/8 bits and the other archs at M = 1 and 4096."""
    def wanted(row):
        if row["arch"] == 90 and row["bits"] == 4:
            return row["M"] in ((1, 4, 16, 64, 256, 1024, 4096) if row["transpose_weight"] else (1, 256, 4096))
        return row["M"] in (1, 4096) and (row["arch"] == 90 or row["bits"] == 4)

    lines = ["| arch | bits | direction | M | bf16 cuBLAS | GEMV | fused | dequant + cuBLAS | dispatch picks | vs bf16 | vs dequant + cuBLAS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [row for row in dispatch if row["shape"] == "gate_proj" and row["group_size"] == 128 and wanted(row)]
    for row in sorted(rows, key=lambda r: (r["arch"] != 90, r["arch"], r["bits"] != 4, r["bits"], not r["transpose_weight"], r["M"])):
        e = row["estimates"]
        cell = lambda p: f"{e[p]:.1f}" if p in e else "-"  # noqa: E731
        lines.append(f"| sm_{row['arch']} | {row['bits']} | {'forward' if row['transpose_weight'] else 'backward'} | "
                     f"{row['M']} | {row['bf16_estimate_us']:.1f} | {cell('gemv')} | {cell('fused')} | "
                     f"{cell('dequant_matmul')} | {row['path']} | {row['bf16_estimate_us'] / row['estimate_us']:.2f}x | "
                     f"{e['dequant_matmul'] / row['estimate_us']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = model_arguments(__doc__.split("\n\n")[0], "sm_90, gate_proj, 4 bits, group size 128 only",
                             "gptq-kernels-static.json", "kernels/gptq/dispatch_table.json")
    args = parser.parse_args()
    table_path = ROOT / "kernels" / "gptq" / "dispatch_table.json"
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
        table = dispatch_table(result["dispatch"])
        if not args.no_table:
            write_dispatch_table(table, table_path)
        apply_dispatch(result["dispatch"], table)
        result["goals"] = goals(result["dispatch"])
        Path(args.from_results).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["goals"], indent=1))
        print(markdown(result["dispatch"]))
        return
    torch.manual_seed(0)
    if args.quick:
        archs, shapes, bits_list, group_sizes = (90,), {"gate_proj": SHAPES["gate_proj"]}, (4,), (128,)
    else:
        archs, shapes, bits_list, group_sizes = tuple(ARCHS), SHAPES, BITS, GROUP_SIZES
    start = time.perf_counter()
    save_codes = disk_cache(_CODE, "kernels/gptq")
    kernels, dispatch = sweep(archs, shapes, bits_list, group_sizes, MS, args.workers)
    save_codes()
    print(f"{len(_CODE)} configurations compiled and modelled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = dispatch_table(dispatch)
    if not args.quick and not args.no_table:
        write_dispatch_table(table, table_path)
    apply_dispatch(dispatch, table)
    launches = [dict(arch=key[0], kernel=key[1], bits=key[2], M=key[3], transpose_weight=key[4], constexprs=c,
                     registers=code.registers, local_bytes=code.local_bytes, shared_bytes=code.shared_bytes,
                     blocks_per_sm=code.blocks_per_sm, instructions=code.instructions,
                     loop_instructions=code.loop_instructions) for key, (c, code) in sorted(_CODE.items())]
    result = {"method": "benchmarks/gptq_kernels_static.py docstring; benchmarks/gpu_model.py docstring",
              "cards": {a: vars(gpu_model.card(TABLE_CARDS[a])) for a in archs}, "parameters": gpu_model.PARAMETERS,
              "versions": versions("triton"), "goals": goals(dispatch), "configurations": launches,
              "kernels": kernels, "dispatch": dispatch}
    path = write_results("gptq-kernels-static" + ("-quick" if args.quick else ""), result,
                         path=Path(args.out) if args.out else None)
    print(json.dumps(result["goals"], indent=1))
    print(markdown(dispatch))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
