"""A machine-code performance model of the 4-bit kernels, for GPUs this project has never run on.

    python benchmarks/kernels_static.py                  # the full sweep: ~150 compiles, writes
                                                         # benchmarks/results/kernels-static.json and
                                                         # kernels/nf4/dispatch_table.json
    python benchmarks/kernels_static.py --quick          # sm_90, one shape: what CI runs
    python benchmarks/kernels_static.py --launchability  # only kernels-launchability.json: blocksize
                                                         # 32..4096 x both decodes x every M bucket x
                                                         # both products x sm_80/86/89/90 (~1400 launches;
                                                         # --launch-kernels fused,fused_split: those only)
    python benchmarks/kernels_static.py --from-results benchmarks/results/kernels-static.json
                                                         # the dispatch table, goals and docs' tables (docs/kernels.md)
                                                         # again from a sweep, compiling nothing

Method. Each distinct launch configuration (arch, kernel, constexprs, warps, stages) is compiled
once through its real launcher with qlora.kernels.launch.compile_only, on a small problem that
selects the same configuration, and read back with qlora.kernels.machine_code (registers, local
memory, shared memory, the SASS of the whole kernel and of its main loop). benchmarks/gpu_model.py
then times every (card, shape, direction, blocksize, M) from that code and the launch grid the
launcher would use (its own config functions, so the two cannot disagree): busiest-SM rounds at that
SM's occupancy, per-unit issue, shared memory, tensor cores, the loop's dependency chain, the DRAM
latency left uncovered by each stream's prefetch distance, DRAM bandwidth, and a fixed per-kernel
cost; cuBLAS bf16 by the same bandwidth, tensor and fixed-cost rules (read gpu_model's docstring).
The model's free parameters are fitted on published timings of gemlite's Triton kernels compiled
through the same path (benchmarks/calibration.py); the fit's held-out error is in the results
("calibration") and labels every table made from them.

Bytes: the packed weight and its scales once per group of GROUP_M row tiles (L2 serves the group),
the activations and the output once, the GEMV's and the fused kernel's fp32 split-K partial sums
written and read back. Paths: dequant_matmul = the dequantize kernel + cuBLAS on the bf16 weight;
fused (split-K by matmul.fused_split where its tiles leave SMs idle: compiled as "fused_split", the
partial sums added by the last split of each output tile in the same launch); gemv (M <= 64, one
launch, the same last-split sum). The dispatch table is per arch, as the runtime knows the arch,
modelled on that arch's datacenter card (A100, A10, L4, H100): of the paths within 5% of that card's
fastest, the one least far from each of the arch's cards' own fastest (arch_path: the RTX 3090 beside
the A10, the RTX 4090 beside the L4). The whole-layer rows (Llama-3-8B, Llama-3-70B) cover all six
cards through that table, as a user's card would dispatch.
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

ROOT = Path(__file__).parents[1]


# The dispatch table is keyed by arch (what the runtime knows); each arch is modelled on its datacenter card.
TABLE_CARDS = {80: "A100", 86: "A10", 89: "L4", 90: "H100"}
ARCHS = tuple(TABLE_CARDS)
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
# A whole decoder layer's seven projections, (out_features, in_features): v = k, o = q, up = gate.
LAYERS = {
    "llama3_8b": {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
                  "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)},
    "llama3_70b": {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192), "o_proj": (8192, 8192),
                   "gate_proj": (28672, 8192), "up_proj": (28672, 8192), "down_proj": (8192, 28672)},
}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES = (64, 128, 256, 4096)
GEMV_MAX_ROWS = 64  # gemv_4bit's own limit


# ---- compiling each distinct configuration once ----------------------------------------------------
_CODE: dict = {}


def representative(blocksize: int, per_element: bool = False, rows: int = 64):
    """A small NF4+DQ weight whose tiles take the same decode as the Llama shapes (row tiles up to
    blocksize 256), or with per_element an in_features that is no multiple of the blocksize."""
    import qlora

    in_features = max(512, blocksize) + (16 if per_element else 0)
    packed, state = qlora.quantize_4bit(torch.randn(rows, in_features) * 0.05, "nf4", blocksize, True)
    return state.packed_view(packed)


def compile_key(arch: int, kernel: str, m: int, blocksize: int, transpose_weight: bool, per_element: bool = False):
    """The representative problem keeps what selects a configuration and what Triton specialises on
    (M == 1; every other size a multiple of 16, like the Llama shapes): the GEMV's rows up to its 16-row
    tile, the fused kernel's BLOCK_M bucket (16, 32, 64) and, within the 16-row one, the 8 rows its
    16-bit forward multiplies at M <= 8 (matmul.fused_loop_flags' ROWS), and M = 1 apart (its SUM_ROWS)."""
    if kernel == "dequantize":
        return (arch, kernel, 1, blocksize, True, per_element)
    rows = min(m, 16) if kernel == "gemv" else m if m == 1 else 8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64
    return (arch, kernel, rows, blocksize, transpose_weight, per_element)


# The fused kernel compiles to two codes: "fused" stores its tile (one split), "fused_split" stores
# fp32 partial sums and the last split adds them (matmul.fused_split's rule picks one per launch).
FUSED_KERNELS = ("fused", "fused_split")


def compile_one(key):
    """Compile one configuration: (key, constexprs, MachineCode)."""
    from qlora.kernels import launch

    arch, kernel, rows, blocksize, transpose_weight, per_element = key
    # 256 rows: the backward's reduction (W's rows) has tiles enough for two splits at any blocksize.
    weight = representative(blocksize, per_element, 256 if kernel == "fused_split" else 64)
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

            matmul_4bit_fused(a, weight, transpose_weight, split_k=2 if kernel == "fused_split" else 1)
    return compiled_record(key, compiled, arch)


def machine_code_for(arch: int, kernel: str, m: int, blocksize: int, transpose_weight: bool):
    """(constexprs, MachineCode) of the main kernel `kernel` at this configuration, compiled once."""
    key = compile_key(arch, kernel, m, blocksize, transpose_weight)
    return cached_code(key, compile_one, _CODE)


def disk_cache(cache: dict, sources: str):
    """Load `cache` from ~/.cache/qlora/model (keyed by triton's version and the kernel sources under
    `sources`), so a rerun of the model compiles nothing that did not change; returns a function that
    saves it back."""
    import hashlib
    import os
    import pickle

    digest = hashlib.sha1(versions("triton")["triton"].encode())
    for path in sorted((ROOT / sources).glob("*.py")):
        digest.update(path.read_bytes())
    digest.update((ROOT / "kernels" / "machine_code.py").read_bytes())
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora" / "model"
    path = folder / f"{sources.replace('/', '-')}-{digest.hexdigest()[:12]}.pkl"
    if path.exists():
        cache.update(pickle.loads(path.read_bytes()))

    def save():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(cache))
    return save


# ---- the model ---------------------------------------------------------------------------------------
def weight_bytes(n: int, k: int, blocksize: int) -> float:
    blocks = n * k / blocksize
    return n * k / 2 + blocks + 4 * blocks / 256  # packed nibbles, uint8 absmax codes, fp32 nested absmax


def gather_tables(blocksize: int, whole_blocks: bool = True, double_quant: bool = True) -> dict:
    """What a 4-bit kernel's gathers read, by bytes a lane (gpu_model.kernel_time's gather_tables): the
    4-byte ones read the 16 fp32 codes (64 B, one line: one per weight) and double quant's 256 fp32
    nested codes (1 KB: one per quantization block in a row tile, one per weight in the
    element-by-element decode), in those proportions. Any other gather would be charged as an unknown
    table."""
    nested = (1.0 if whole_blocks else float(blocksize)) if double_quant else 0.0
    code = float(blocksize)
    return {4: [(64, code / (code + nested)), (1024, nested / (code + nested))]}


def kernel_bounds(card, code, programs: int, trips: float, bytes_moved: float, tables: dict | None = None) -> dict:
    """gpu_model.kernel_time of one launch, flattened: estimate_us and the breakdown's bounds; `tables`:
    what its gathers read (gather_tables for the 4-bit kernels)."""
    timed = gpu_model.kernel_time(code, card, programs, trips, bytes_moved, gather_tables=tables)
    return {"estimate_us": timed["estimate_us"], **timed["breakdown"]}


def cublas_us(card, m: int, n: int, k: int) -> float:
    return gpu_model.cublas_time(card, m, n, k)["estimate_us"]


def path_estimates(card, m: int, n: int, k: int, blocksize: int, transpose_weight: bool, record,
                   split_k: int | None = None) -> dict:
    """Estimated microseconds of each Triton path for C = A @ (W^T or W), W [n, k], on `card`;
    `record(row)` receives each kernel launch's entry. `split_k`: the fused launch's split, as
    matmul_4bit_fused takes it (default: the launcher's own rule)."""
    from qlora.kernels.nf4.dequantize import dequantize_elements
    from qlora.kernels.nf4.gemv import gemv_block_sizes, gemv_split, split_sum_loads
    from qlora.kernels.nf4.matmul import fused_plan, weight_strides

    spec = gpu_model.card(card)
    arch = spec.arch
    r, cols, _, _ = weight_strides((n, k), transpose_weight)
    w4 = weight_bytes(n, k, blocksize)
    common = dict(card=spec.name, arch=arch, M=m, N=n, K=k, blocksize=blocksize, transpose_weight=transpose_weight)

    def entry(kernel, code, bounds):
        record({**common, "kernel": kernel, "registers": code.registers, "local_bytes": code.local_bytes,
                "shared_bytes": code.shared_bytes, "shared_limit": _shared_limit(arch),
                "blocks_per_sm": code.blocks_per_sm, **{key: round(v, 3) if isinstance(v, float) else v
                                                        for key, v in bounds.items()}})
        return bounds["estimate_us"]

    out = {}
    # dequantize, then cuBLAS
    _, code = machine_code_for(arch, "dequantize", 1, blocksize, True)
    elements = dequantize_elements(blocksize)
    bounds = kernel_bounds(spec, code, math.ceil(n * k / elements), 1, w4 + 2 * n * k, gather_tables(blocksize))
    out["dequant_matmul"] = entry("dequantize", code, bounds) + cublas_us(spec, m, cols, r)
    # The last split waits on the counter's atomic (a DRAM latency past the one the model charges
    # every kernel's epilogue), then on the partial sums, just written and so in L2: a few splits'
    # loads at a time (gemv.sum_split_partials), an L2 round trip each time.
    latency_us = spec.dram_latency_cycles * gpu_model.PARAMETERS["latency_scale"] / (spec.clock_ghz * 1e3)

    def fixup_us(split: int, loads: int) -> float:
        if split == 1:
            return 0.0
        return latency_us * (1 + math.ceil(split / loads) * gpu_model.L2_LATENCY_FRACTION)

    # fused: split-K (matmul.fused_split) where its tiles leave SMs idle, the partial sums summed by
    # the last split of each tile in the same launch
    config, flags, tiles, split_k, r_per_split = fused_plan(m, torch.bfloat16, (n, k), blocksize, transpose_weight, True,
                                                           arch, _Device(spec.sms), split_k)
    tiles_m = math.ceil(m / config["BLOCK_M"])
    constexprs, code = machine_code_for(arch, "fused_split" if split_k > 1 else "fused", m, blocksize, transpose_weight)
    partials = 8 * split_k * m * cols if split_k > 1 else 0
    bytes_moved = w4 * math.ceil(tiles_m / 8) + 2 * (m * r + m * cols) + partials
    bounds = kernel_bounds(spec, code, tiles * split_k, math.ceil(r_per_split / config["BLOCK_R"]),
                           bytes_moved, gather_tables(blocksize, constexprs["WHOLE_BLOCKS"]))
    out["fused"] = entry("fused", code, {**bounds, "split_k": split_k}) + fixup_us(split_k, flags["SUM_LOADS"])
    # GEMV: split-K partial sums, added up by the last split of each tile in the same launch
    if m <= GEMV_MAX_ROWS:
        _, code = machine_code_for(arch, "gemv", m, blocksize, transpose_weight)
        block_m, block_n, block_r, whole_blocks = gemv_block_sizes(m, (n, k), blocksize, transpose_weight)
        tables = gather_tables(blocksize, whole_blocks)
        split_k, r_per_split = gemv_split(m, cols, r, block_m, block_n, block_r, _Device(spec.sms))
        programs = math.ceil(cols / block_n) * split_k * math.ceil(m / block_m)
        # fp32 partial sums written and read back once (split > 1), and the output stored once.
        partials = 8 * split_k * m * cols if split_k > 1 else 0
        bounds = kernel_bounds(spec, code, programs, math.ceil(r_per_split / block_r),
                               w4 * math.ceil(m / block_m) + 2 * m * r + partials + 2 * m * cols, tables)
        out["gemv"] = entry("gemv", code, {**bounds, "split_k": split_k}) + fixup_us(
            split_k, split_sum_loads(block_m, block_n))
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
            for kernel in ("dequantize", "gemv", *FUSED_KERNELS) for m in ms for transpose_weight in (True, False)
            if kernel != "gemv" or m <= GEMV_MAX_ROWS]
    compile_missing(keys, workers, compile_one, _CODE)
    kernels, dispatch = [], []
    seen = set()

    def record(row):
        key = (row["card"], row["kernel"], row["M"], row["N"], row["K"], row["blocksize"], row["transpose_weight"])
        if key not in seen:
            seen.add(key)
            kernels.append(row)

    for arch in archs:
        start = time.perf_counter()
        for name, (n, k) in shapes.items():
            for transpose_weight in (True, False):
                for blocksize in blocksizes:
                    for m in ms:
                        estimates = path_estimates(TABLE_CARDS[arch], m, n, k, blocksize, transpose_weight, record)
                        others = [path_estimates(card, m, n, k, blocksize, transpose_weight, lambda row: None)
                                  for card in arch_cards(arch) if card != TABLE_CARDS[arch]]
                        r, cols = (k, n) if transpose_weight else (n, k)
                        best = arch_path([estimates, *others])
                        dispatch.append(dict(arch=arch, card=TABLE_CARDS[arch], shape=name, M=m, N=n, K=k, blocksize=blocksize,
                                             transpose_weight=transpose_weight,
                                             estimates={p: round(v, 3) for p, v in estimates.items()},
                                             best_path=best, best_estimate_us=round(min(estimates.values()), 3),
                                             bf16_estimate_us=round(cublas_us(TABLE_CARDS[arch], m, cols, r), 3)))
        print(f"sm_{arch}: {len(_CODE)} configurations compiled so far, {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    return kernels, dispatch


def arch_cards(arch: int) -> list:
    """The modelled cards of one arch, the table card first: the runtime knows the arch, not the card."""
    return sorted((name for name, spec in gpu_model.CARDS.items() if spec.arch == arch),
                  key=lambda name: name != TABLE_CARDS[arch])


# How much slower than its fastest path the table card may be dispatched, for its arch's other cards.
ARCH_PATH_SLACK = 1.05


def arch_path(estimates_per_card: list) -> str:
    """The path for every card of an arch, the table card's estimates first: of the paths within
    ARCH_PATH_SLACK of the table card's fastest, the least worst ratio to each card's own fastest.
    An A10 (600 GB/s) and an RTX 3090 (936 GB/s) share sm_86's table: at M = 1 the A10 had the GEMV
    and the fused kernel within 0.3% on q_proj and down_proj, where the 3090's fused kernel was 10%
    and 7% faster than its GEMV. Ties go to the table card's order of paths."""
    table = estimates_per_card[0]
    near = [path for path in table if table[path] <= ARCH_PATH_SLACK * min(table.values())]

    def regret(path):
        return max(estimates[path] / min(estimates.values()) for estimates in estimates_per_card)

    return min(near, key=regret)


def card_rows(cards, ms, record) -> list:
    """Every distinct projection of LAYERS, blocksize 64, both directions, on every card: each path's
    estimate and cuBLAS bf16, the rows the whole-layer figures and the flags are read from."""
    shapes = sorted({shape for projections in LAYERS.values() for shape in projections.values()})
    rows = []
    for card_name, (n, k), transpose_weight, m in itertools.product(cards, shapes, (True, False), ms):
        spec = gpu_model.card(card_name)
        estimates = path_estimates(spec, m, n, k, 64, transpose_weight, record)
        r, cols = (k, n) if transpose_weight else (n, k)
        rows.append(dict(card=card_name, arch=spec.arch, M=m, N=n, K=k, transpose_weight=transpose_weight,
                         estimates={p: round(v, 3) for p, v in estimates.items()},
                         bf16_estimate_us=round(cublas_us(spec, m, cols, r), 3)))
    return rows


def layer_rows(rows: list) -> list:
    """Whole decoder layers as a user's card runs them: per card, model, M and direction, the seven
    projections summed, each on the path ops.choose_path picks for the card's arch (this run's
    table), beside cuBLAS bf16 on the same seven products."""
    from qlora.kernels.nf4.ops import choose_path

    index = {(r["card"], r["M"], r["N"], r["K"], r["transpose_weight"]): r for r in rows}
    out = []
    for card_name, model, m, transpose_weight in sorted({(r["card"], model, r["M"], r["transpose_weight"])
                                                          for r in rows for model in LAYERS}):
        qlora_us = bf16_us = 0.0
        paths = {}
        for name, (n, k) in LAYERS[model].items():
            row = index[(card_name, m, n, k, transpose_weight)]
            path = choose_path(m, torch.bfloat16, row["arch"], transpose_weight, n if transpose_weight else k, (n, k), 64)
            paths[name] = path
            qlora_us += row["estimates"][path]
            bf16_us += row["bf16_estimate_us"]
        out.append(dict(card=card_name, model=model, M=m, direction="forward" if transpose_weight else "backward",
                        qlora_us=round(qlora_us, 2), bf16_us=round(bf16_us, 2), speedup=round(bf16_us / qlora_us, 3),
                        paths=paths))
    return out


def flagged(rows: list) -> list:
    """Forward predictions the model itself must consider wrong: a 4-bit kernel of ours (GEMV or fused;
    dequantize + cuBLAS is cuBLAS's speed, not a 4-bit kernel's) dispatched at a speed-up over bf16 above
    the best published hand-written CUDA kernel (Marlin, torchao's tinygemm) on the same card at the
    same M, at the published shape nearest in size (4096 x 4096 or 8192 x 8192)."""
    from qlora.kernels.nf4.ops import choose_path

    bar = {}
    for point in json.loads((ROOT / "benchmarks" / "results" / "published-kernels.json").read_text())["points"]:
        if point["kernel"] in ("marlin", "torchao_tinygemm"):
            key = (point["card"], point["M"], point["N"])
            if point["speedup"] > bar.get(key, (0,))[0]:
                bar[key] = (point["speedup"], point["kernel"], point["source"])
    out = []
    for row in rows:
        if not row["transpose_weight"]:
            continue
        side = 4096 if abs(math.log(row["N"] * row["K"] / 4096**2)) < abs(math.log(row["N"] * row["K"] / 8192**2)) else 8192
        best = bar.get((row["card"], row["M"], side))
        if best is None:
            continue
        path = choose_path(row["M"], torch.bfloat16, row["arch"], True, row["N"], (row["N"], row["K"]), 64)
        if path == "dequant_matmul":
            continue
        speedup = round(row["bf16_estimate_us"] / row["estimates"][path], 3)  # as written: 1.513 is not above 1.513
        if speedup > best[0]:
            out.append(dict(card=row["card"], M=row["M"], N=row["N"], K=row["K"], path=path,
                            model_speedup=speedup, published_best_cuda=best[1], published_speedup=best[0],
                            source=best[2], note="model error: a prediction above the best hand-written CUDA kernel"))
    return out


def dispatch_table(dispatch: list, blocksize: int | None = None) -> dict:
    """arch -> direction -> (out_features, in_features, blocksize) -> ((largest M, path), ...): at
    every M of the sweep the row's best path (arch_path: over the arch's cards), consecutive M with
    the same path merged into one bucket. `blocksize` keeps one blocksize only."""
    table = {}
    for row in sorted(dispatch, key=lambda row: (row["arch"], not row["transpose_weight"], row["N"], row["K"],
                                                 row["blocksize"], row["M"])):
        if blocksize is not None and row["blocksize"] != blocksize:
            continue
        direction = "forward" if row["transpose_weight"] else "backward"
        buckets = table.setdefault(row["arch"], {}).setdefault(direction, {}).setdefault(
            (row["N"], row["K"], row["blocksize"]), [])
        best = row["best_path"]
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
        out["decode_speedup_M1_goal"] = 1.5  # H100 decode, as for the whole layer (layer_goals)
    small = [m for m in rows if 2 <= m <= 16]
    out["worst_M2_16_bf16_over_dispatched"] = round(min(
        rows[m]["bf16_estimate_us"] / rows[m]["estimate_us"] for m in small), 3) if small else None
    dequant = [row for row in kernels if row["arch"] == 90 and row["kernel"] == "dequantize" and row["N"] == 14336
               and row["K"] == 4096 and row["blocksize"] == 64]
    if dequant:
        out["dequantize_fraction_of_bandwidth_bound"] = round(dequant[0]["dram_us"] / dequant[0]["estimate_us"], 3)
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
LAUNCH_ROWS = {"gemv": (1, 2, 4, 8, 16), "fused": (1, 8, 16, 32, 64), "fused_split": (1, 8, 16, 32, 64)}


def launch_keys(archs, blocksizes=LAUNCH_BLOCKSIZES, kernels=None) -> list:
    """(compile key, decode label) of every launch the launchability sweep checks (of `kernels` only,
    when given)."""
    from qlora.kernels.nf4.dequantize import MAX_TILE_BLOCKSIZE

    out = []
    for arch, bs in itertools.product(archs, blocksizes):
        out.append(((arch, "dequantize", 1, bs, True, False), "flat"))
        for per_element, (kernel, rows), transpose_weight in itertools.product(
                (False, True), LAUNCH_ROWS.items(), (True, False)):
            for m in rows:
                key = (arch, kernel, m, bs, transpose_weight, per_element or bs > MAX_TILE_BLOCKSIZE)
                out.append((key, "per_element" if per_element else "whole_block"))
    return [(key, decode) for key, decode in out if kernels is None or key[1] in kernels]


def launchability(archs, blocksizes=LAUNCH_BLOCKSIZES, workers: int = 1, kernels=None) -> list:
    """One row per (arch, kernel, blocksize, decode, M bucket, direction): the representative
    problem's shape and the compiled configuration's resources (the "kernels" rows' schema, less
    the bounds, which need a Llama shape)."""
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK

    keys = launch_keys(archs, blocksizes, kernels)
    compile_missing([key for key, _ in keys], workers, compile_one, _CODE)
    rows = []
    for key, decode in keys:
        arch, kernel, m, bs, transpose_weight, per_element = key
        constexprs, code = _CODE[key]
        weight_in = max(512, bs) + (16 if per_element else 0)  # representative()'s weight: [64 or 256, weight_in]
        rows.append(dict(arch=arch, kernel=kernel, M=m, N=256 if kernel == "fused_split" else 64, K=weight_in, blocksize=bs, transpose_weight=transpose_weight,
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
    lines += ["", "| H100 kernel, gate_proj forward | M | registers | shared | blocks/SM | DRAM us | issue us | latency us | "
              "tensor us | bound | estimate us |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in kernels:
        if row["card"] == "H100" and row["N"] == 14336 and row["K"] == 4096 and row["transpose_weight"] and row["blocksize"] == 64 \
                and row["M"] in (1, 16, 4096):
            lines.append(f"| {row['kernel']} | {row['M']} | {row['registers']} | {row['shared_bytes'] // 1024} KB | "
                         f"{row['blocks_per_sm']} | {row['dram_us']:.1f} | {row['issue_us']:.1f} | {row['latency_us']:.1f} | "
                         f"{row['tensor_us']:.1f} | {row['bound']} | {row['estimate_us']:.1f} |")
    return "\n".join(lines)


def calibration_summary() -> dict:
    """The calibration section of the results: benchmarks/results/calibration.json's points, fitted
    parameters and errors (benchmarks/calibration.py), or the defaults, marked uncalibrated."""
    path = ROOT / "benchmarks" / "results" / "calibration.json"
    if not path.exists():
        return {"parameters": gpu_model.PARAMETERS, "points": [], "held_out_median_abs_error": None,
                "held_out_worst_abs_error": None, "note": "uncalibrated: run benchmarks/calibration.py"}
    fitted = json.loads(path.read_text())
    points = [{k: p[k] for k in ("kernel", "card", "M", "N", "K", "published_us", "model_us", "held_out", "source")}
              for p in fitted["points"]]
    return {"points": points, "parameters": fitted["parameters"],
            **{k: fitted[k] for k in ("held_out_median_abs_error", "held_out_worst_abs_error",
                                      "train_median_abs_error", "train_worst_abs_error")},
            "method": "benchmarks/calibration.py docstring"}


def finish(result: dict, dispatch: list, kernels: list, cards: list) -> dict:
    """The parts of the results read from the rows after the table is written: dispatched paths, goals,
    whole layers, flags, calibration."""
    apply_dispatch(dispatch)
    result["goals_sm90_gate_proj_bs64_forward"] = goals(dispatch, kernels)
    result["cards"] = cards
    result["layers"] = layer_rows(cards)
    result["layer_goals"] = layer_goals(result["layers"])
    result["flagged"] = flagged(cards)
    result["calibration"] = calibration_summary()
    return result


def layers_markdown(layers: list, calibration: dict) -> str:
    """The whole-layer table of docs/kernels.md and README: Llama-3-8B and a 70B layer, forward and
    backward, bf16 / NF4 time per card and M bucket, labelled with the calibration error."""
    error = calibration.get("held_out_median_abs_error")
    worst = calibration.get("held_out_worst_abs_error")
    label = (f"model estimate, calibration error {error:.0%} median, {worst:.0%} worst (held out)"
             if error is not None else "model estimate, uncalibrated")
    ms = (1, 4, 16, 64, 256, 1024, 4096)
    lines = [f"Whole layer, speed-up of NF4 over bf16 ({label}):", "",
             "| card | layer | direction | " + " | ".join(f"M={m}" for m in ms) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ms) + " |"]
    index = {(r["card"], r["model"], r["direction"], r["M"]): r for r in layers}
    for card_name in gpu_model.CARDS:
        for model in LAYERS:
            for direction in ("forward", "backward"):
                cells = [index.get((card_name, model, direction, m)) for m in ms]
                if not any(cells):
                    continue
                lines.append(f"| {card_name} | {model} | {direction} | " + " | ".join(
                    f"{c['speedup']:.2f}x" if c else "-" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = model_arguments(__doc__.split("\n\n")[0], "sm_90 / H100, gate_proj, blocksize 64 only (CI)", "kernels-static.json",
                             "kernels/nf4/dispatch_table.json")
    parser.add_argument("--launchability", action="store_true",
                        help="only the launchability sweep (blocksize 32..4096, both decodes, every M bucket, "
                             "both products, every arch): benchmarks/results/kernels-launchability.json")
    parser.add_argument("--launch-kernels", default=None,
                        help="with --launchability: only these kernels, comma-separated (dequantize, gemv, fused, "
                             "fused_split); the other kernels' rows are kept from kernels-launchability.json")
    parser.add_argument("--no-launchability", action="store_true",
                        help="the full sweep without the launchability sweep that follows it (its results depend on "
                             "the kernels' code only, not on the model)")
    args = parser.parse_args()
    if args.launchability:
        torch.manual_seed(0)
        save_codes = disk_cache(_CODE, "kernels/nf4")  # the sweep's compiles of the same keys
        write_launchability(tuple(ARCHS), args.workers,
                            tuple(args.launch_kernels.split(",")) if args.launch_kernels else None)
        save_codes()
        return
    table_path = ROOT / "kernels" / "nf4" / "dispatch_table.json"
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
        dispatch, kernels = result["dispatch"], result["kernels"]
        if not args.no_table:
            write_dispatch_table(dispatch_table(dispatch), table_path, predictions(dispatch))
        finish(result, dispatch, kernels, result["cards"])
        Path(args.from_results).write_text(json.dumps(result, indent=2) + "\n")
        print_summary(result)
        return
    torch.manual_seed(0)
    save_codes = disk_cache(_CODE, "kernels/nf4")
    if args.quick:
        archs, shapes, blocksizes, cards = (90,), {"gate_proj": SHAPES["gate_proj"]}, (64,), ("H100",)
    else:
        archs, shapes, blocksizes, cards = tuple(ARCHS), SHAPES, BLOCKSIZES, tuple(gpu_model.CARDS)
    kernels, dispatch = sweep(archs, shapes, blocksizes, MS, args.workers)
    table = dispatch_table(dispatch)
    if not args.quick and not args.no_table:
        write_dispatch_table(table, table_path, predictions(dispatch))
    seen = {(r["card"], r["kernel"], r["M"], r["N"], r["K"], r["blocksize"], r["transpose_weight"]) for r in kernels}

    def record(row):  # the launches of the table cards only: the other cards run the same code
        key = (row["card"], row["kernel"], row["M"], row["N"], row["K"], row["blocksize"], row["transpose_weight"])
        if key not in seen and row["card"] in TABLE_CARDS.values():
            seen.add(key)
            kernels.append(row)

    rows = card_rows(cards, MS, record)
    save_codes()
    result = {"method": "benchmarks/kernels_static.py docstring; benchmarks/gpu_model.py docstring",
              "cards_modelled": {name: vars(gpu_model.card(name)) for name in cards},
              "table_cards": {arch: TABLE_CARDS[arch] for arch in archs},
              "parameters": gpu_model.PARAMETERS, "versions": versions("triton")}
    finish(result, dispatch, kernels, rows)
    result["kernels"], result["dispatch"] = kernels, dispatch
    path = write_results("kernels-static" + ("-quick" if args.quick else ""), result,
                         path=Path(args.out) if args.out else None)
    print_summary(result)
    print(f"wrote {path}", file=sys.stderr)
    if not args.quick and not args.no_launchability:
        write_launchability(archs, args.workers)


def layer_goals(layers: list) -> dict:
    """The whole-layer goals, Llama-3-8B: never slower than bf16 at M = 1..16 on any card (forward, and
    backward apart), H100 decode (M = 1, forward) at least 1.5x bf16, and at least as fast as gemlite
    modelled by the same rules (benchmarks/calibration.py's gemlite_layers, forward) at every M
    bucket; each with the worst row."""
    rows = [r for r in layers if r["model"] == "llama3_8b" and r["direction"] == "forward"]
    out = {}
    for key, direction in (("worst_speedup_M1_16_every_card", "forward"),
                           ("worst_speedup_M1_16_every_card_backward", "backward")):
        small = [r for r in layers if r["model"] == "llama3_8b" and r["direction"] == direction and 1 <= r["M"] <= 16]
        if small:
            worst = min(small, key=lambda r: r["speedup"])
            out[key] = {"speedup": worst["speedup"], "card": worst["card"], "M": worst["M"], "goal": 1.0}
    h100 = [r for r in rows if r["card"] == "H100" and r["M"] == 1]
    if h100:
        out["h100_decode_M1_speedup"] = {"speedup": h100[0]["speedup"], "goal": 1.5}
    path = ROOT / "benchmarks" / "results" / "calibration.json"
    peers = json.loads(path.read_text()).get("gemlite_layers", []) if path.exists() else []
    index = {(r["card"], r["M"]): r for r in rows}
    versus = [dict(card=p["card"], M=p["M"], qlora_us=index[(p["card"], p["M"])]["qlora_us"], gemlite_us=p["gemlite_us"],
                   gemlite_over_qlora=round(p["gemlite_us"] / index[(p["card"], p["M"])]["qlora_us"], 3))
              for p in peers if (p["card"], p["M"]) in index]
    if versus:
        worst = min(versus, key=lambda r: r["gemlite_over_qlora"])
        out["versus_gemlite_same_rules"] = {"rows": versus, "worst": worst, "goal": 1.0}
    return out


def print_summary(result: dict) -> None:
    calibration = result["calibration"]
    print(f"calibration: held-out error median {calibration['held_out_median_abs_error']}, "
          f"worst {calibration['held_out_worst_abs_error']} (fractions)")
    print(json.dumps(result["goals_sm90_gate_proj_bs64_forward"], indent=1))
    print(json.dumps(result["layer_goals"], indent=1))
    print(f"flagged: {len(result['flagged'])} predictions above the best published CUDA kernel")
    print(markdown(result["dispatch"], result["kernels"]))
    print()
    print(layers_markdown(result["layers"], calibration))


def write_launchability(archs, workers: int, kernels=None) -> None:
    """benchmarks/results/kernels-launchability.json; with `kernels`, only their launches are compiled
    again and the other kernels' rows are kept from the file (for a change to one kernel's code)."""
    launches = launchability(archs, LAUNCH_BLOCKSIZES, workers, kernels)
    if kernels:
        path = ROOT / "benchmarks" / "results" / "kernels-launchability.json"
        kept = [row for row in json.loads(path.read_text())["launches"] if row["kernel"] not in kernels]
        launches = kept + launches
    defects = [row for row in launches if row["local_bytes"] or row["shared_bytes"] > row["shared_limit"]
               or row["blocks_per_sm"] < 1]
    path = write_results("kernels-launchability", {"versions": versions("triton"), "launches": launches})
    print(f"launchability: {len(launches)} launches, {len(defects)} spill or do not fit; wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
