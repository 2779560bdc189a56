"""The grouped 4-bit expert kernel (kernels/moe/grouped.py) in the machine-code performance model, against
bf16 grouped GEMMs, at the expert shapes of Qwen3-30B-A3B and Mixtral-8x7B, for GPUs this project has
never run on. Every figure is an estimate of the model, not a measurement.

    python benchmarks/moe_kernels_static.py            # 6 cards (4 archs): ~30 compiles, writes
                                                       # benchmarks/results/moe-kernels-static.json
    python benchmarks/moe_kernels_static.py --quick    # the H100 only

Shapes (transformers 5 holds each layer's experts fused as [E, out, in]): Qwen3-30B-A3B, 128 experts,
hidden 2048, expert width 768, top-8: gate_up [128, 1536, 2048], down [128, 2048, 768]; Mixtral-8x7B,
8 experts, hidden 4096, width 14336, top-2: gate_up [8, 28672, 4096], down [8, 4096, 14336]. Token
counts: decode (1 and 8 tokens) and prefill (512 and 4096 tokens); rows = tokens x top-k.

Routing is modelled as uniform: `tokens` tokens each pick top-k of E experts, so the expected number
of experts with tokens is E (1 - (1 - k/E)^tokens), and the rows spread evenly over them (one token
of Qwen3 is 8 experts of 1 row; 4096 tokens are 128 experts of 256 rows). Real routers are less even,
which adds row tiles (at most one per active expert) to ours and GEMMs of odd sizes to the peers.

Paths, each per projection and direction (forward Y = X W_e^T; backward dX = dY W_e, no dW):
- grouped 4-bit (ours): one launch. Compiled through its real launcher under compile_only on a
  small stack that selects the same tile configuration, read back by qlora.kernels.machine_code, then
  estimated by benchmarks/gpu_model.py's kernel_time (the rules every kernel of this project is judged
  by, calibrated on published kernels: busiest-SM rounds, per-unit issue, the loop's dependency chain,
  each DRAM stream's prefetch distance, one fixed cost and one tensor derate for every kernel) for the
  launch the launcher would make: programs = the row tiles the counts need (the schedule's upper bound
  adds at most min(E, T) programs that return after the expert lookup: not charged) x column tiles;
  loop trips = R / BLOCK_R; DRAM bytes = each active expert's 4-bit weight (packed + uint8 absmax codes
  + fp32 nested absmax) once per GROUP_M (8) of its row tiles, the activations and the output once.
  Where the launcher splits the reduction (grids smaller than the SMs: Mixtral's down projection at
  decode), programs x splits, trips per split, the fp32 partial sums written and read, and the two
  launches that sum and cast them (gpu_model.bandwidth_us each).
- bf16 grouped GEMM (torch._grouped_mm, one launch): gpu_model's cuBLAS rule (best tile shape, busiest-SM
  waves, the same tensor derate) over every active expert's row tiles, its bytes the active experts'
  bf16 weights plus activations and output.
- bf16 per-expert cuBLAS: gpu_model.cublas_time per active expert (a launch each), summed.
- dequant + bf16 grouped: the 4-bit dequantize kernel over the active experts (its compiled code and
  kernel_time, as in kernels_static.py), then the bf16 grouped GEMM.
The ratios compare ours with the bf16 peers at the same rows: below 1 means the 4-bit kernel is the
slower; the 4-bit weights themselves are 3.9x fewer bytes than bf16 whatever the ratio.

All of the model is reached through `machine_code_model()`, one small function, so that the model
module can be swapped without touching the rest.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cached_code, compile_missing, compiled_record, print_table, versions, write_results  # noqa: E402

MODELS = {  # name: (experts, top-k, {projection: (out, in)})
    "Qwen3-30B-A3B": (128, 8, {"gate_up": (1536, 2048), "down": (2048, 768)}),
    "Mixtral-8x7B": (8, 2, {"gate_up": (28672, 4096), "down": (4096, 14336)}),
}
TOKENS = {"decode": (1, 8), "prefill": (512, 4096)}
BLOCKSIZE = 64
GROUP_M = 8  # grouped.py's launch: row tiles sharing a W column tile in L2

_CODE: dict = {}


def machine_code_model():
    """The machine-code model's pieces this benchmark uses (benchmarks/gpu_model.py, the one model every
    kernel family is judged by, calibrated on published kernels): the cards, one launch's estimate from its
    compiled code, cuBLAS bf16 for one GEMM and for a grouped GEMM (one launch over all experts), and the
    4-bit dequantize kernel's code (benchmarks/kernels_static.py)."""
    import gpu_model
    import kernels_static

    def grouped_gemm_us(card: str, counts: list[int], n: int, k: int) -> float:
        """torch._grouped_mm in bf16: cuBLAS's rule (gpu_model.cublas_time) over every active expert's row
        tiles in one launch, its bytes the active experts' bf16 weights plus activations and output."""
        p, spec = gpu_model.PARAMETERS, gpu_model.card(card)
        rate = spec.tensor_flop_per_clock * p["tensor_efficiency"] * spec.clock_ghz * 1e3  # FLOP per us per SM
        dram = 2 * (len(counts) * n * k + sum(counts) * (k + n)) / (p["bandwidth_fraction"] * spec.bandwidth_gbs * 1e3)
        best = None
        for tile_m, tile_n in gpu_model.CUBLAS_TILES:
            tiles = sum(math.ceil(c / tile_m) for c in counts) * math.ceil(n / tile_n)
            rows = min(tile_m, max(16, max(counts)))
            tensor = math.ceil(tiles / spec.sms) * 2 * rows * tile_n * k / rate
            total = max(tensor, dram) + p["fixed_us"]
            best = total if best is None else min(best, total)
        return best

    def dequantize_us(card: str, n: int, k: int, active: int, blocksize: int) -> float:
        from qlora.kernels.nf4.dequantize import dequantize_elements

        _, code = kernels_static.machine_code_for(gpu_model.card(card).arch, "dequantize", 1, blocksize, True)
        numel = active * n * k
        return kernel_bounds(card, code, math.ceil(numel / dequantize_elements(blocksize)), 1,
                             active * kernels_static.weight_bytes(n, k, blocksize) + 2 * numel,
                             kernels_static.gather_tables(blocksize))["estimate_us"]

    def kernel_bounds(card: str, code, programs: int, trips: float, bytes_moved: float, tables: dict) -> dict:
        return kernels_static.kernel_bounds(card, code, programs, trips, bytes_moved, tables)

    return types.SimpleNamespace(cards=gpu_model.CARDS, kernel_bounds=kernel_bounds, gather_tables=kernels_static.gather_tables, gemm_us=kernels_static.cublas_us,
                                 grouped_gemm_us=grouped_gemm_us, dequantize_us=dequantize_us,
                                 memory_us=gpu_model.bandwidth_us, weight_bytes=kernels_static.weight_bytes,
                                 calibration=gpu_model.PARAMETERS, method="benchmarks/gpu_model.py docstring")


# ---- compiling each distinct configuration once ----------------------------------------------------
def representative(out_features: int, in_features: int):
    """A 4-expert NF4+DQ stack that takes the same tile configuration as the model's shapes: rows of W
    hold whole 64-blocks (row-tile decode) and the kernel specialises on no size but 16-divisibility."""
    import qlora
    from qlora.kernels.moe.packed import PackedExperts4bit

    experts = []
    for _ in range(4):
        packed, state = qlora.quantize_4bit(torch.randn(out_features, in_features) * 0.05, "nf4", BLOCKSIZE, True)
        experts.append(state.packed_view(packed))
    return PackedExperts4bit.stack(experts)


def compile_key(arch: int, rows: int, num_experts: int, transpose_weight: bool, split: bool) -> tuple:
    """What selects the configuration: the arch, the rows per active expert (16, 32, 64, 128 and up:
    grouped_config's tile heights), the direction and whether the reduction is split."""
    from qlora.kernels.moe.grouped import rows_per_expert

    per_expert = rows_per_expert(rows, num_experts)
    bucket = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert < 128 else 128
    return (arch, bucket, transpose_weight, split)


def compile_one(key):
    """4 experts of `bucket` rows each (rows_per_expert gives the bucket back); a 512-long reduction
    over one column tile splits, a 256-long one over four does not (split_k: at least 4 tiles a split)."""
    from qlora.kernels import launch
    from qlora.kernels.moe.grouped import grouped_matmul_4bit

    arch, bucket, transpose_weight, split = key
    n, k = ((64, 512) if transpose_weight else (512, 64)) if split else (256, 256)
    stack = representative(n, k)
    a = torch.randn(4 * bucket, k if transpose_weight else n, dtype=torch.bfloat16)
    with launch.compile_only(arch) as compiled:
        grouped_matmul_4bit(a, stack, torch.zeros(4, dtype=torch.int32), transpose_weight)
    key_out, constexprs, code = compiled_record(key, compiled, arch)
    if (constexprs["SPLIT_K"] > 1) != split:
        raise RuntimeError(f"the stand-in for {key} compiled SPLIT_K={constexprs['SPLIT_K']}")
    return key_out, constexprs, code


# ---- the model ---------------------------------------------------------------------------------------
def routing(tokens: int, num_experts: int, top_k: int) -> tuple[int, list[int]]:
    """(rows, counts of the active experts) under uniform routing, rows spread evenly."""
    rows = tokens * top_k
    active = max(1, min(rows, round(num_experts * (1 - (1 - top_k / num_experts) ** tokens))))
    base, extra = divmod(rows, active)
    return rows, [base + (i < extra) for i in range(active)]


def launch_plan(model, card: str, rows: int, num_experts: int, n: int, k: int, transpose_weight: bool) -> dict:
    """What the launcher does for these sizes on the card: its tile config and its split of the reduction
    (grouped.py's own functions, the card's SM count)."""
    from qlora.kernels.moe.grouped import grouped_config, row_tiles_bound, split_k
    from qlora.kernels.moe.packed import PackedExperts4bit
    from qlora.kernels.nf4.matmul import weight_strides

    r, cols, _, _ = weight_strides((n, k), transpose_weight)
    # A stand-in stack: grouped_config reads only the shape, the blocksize and E.
    shape_only = PackedExperts4bit(None, None, None, None, None, None, BLOCKSIZE, 256, (num_experts, n, k))
    config = grouped_config(rows, torch.bfloat16, shape_only, transpose_weight, model.cards[card].arch)
    bound = row_tiles_bound(rows, num_experts, config["BLOCK_M"]) * math.ceil(cols / config["BLOCK_N"])
    split, r_per_split = split_k(bound, r, config["BLOCK_R"], model.cards[card].sms)
    return dict(config, r=r, cols=cols, split=split, r_per_split=r_per_split)


def grouped_4bit_us(model, card: str, counts: list[int], num_experts: int, n: int, k: int, transpose_weight: bool):
    """(estimate, bounds, configuration) of our launch, plus the split-K sum where the reduction is split."""
    rows = sum(counts)
    arch = model.cards[card].arch
    plan = launch_plan(model, card, rows, num_experts, n, k, transpose_weight)
    r, cols, split = plan["r"], plan["cols"], plan["split"]
    constexprs, code = cached_code(compile_key(arch, rows, num_experts, transpose_weight, split > 1), compile_one, _CODE)
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_R", "WHOLE_BLOCKS"):
        if constexprs[name] != plan[name]:
            raise RuntimeError(f"the compiled stand-in's {name}={constexprs[name]} is not the launch's {plan[name]}")
    block_m, block_r = plan["BLOCK_M"], plan["BLOCK_R"]
    tiles_per_expert = [math.ceil(c / block_m) for c in counts]
    programs = sum(tiles_per_expert) * math.ceil(cols / plan["BLOCK_N"]) * split
    weight = model.weight_bytes(n, k, BLOCKSIZE) * sum(math.ceil(t / GROUP_M) for t in tiles_per_expert)
    partial = 4 * split * rows * cols if split > 1 else 0
    bounds = model.kernel_bounds(card, code, programs, math.ceil(plan["r_per_split"] / block_r),
                                 weight + 2 * rows * r + (partial or 2 * rows * cols),
                                 model.gather_tables(BLOCKSIZE, constexprs["WHOLE_BLOCKS"]))
    estimate = bounds["estimate_us"]
    if split > 1:  # the fixed-order sum of the partials (fp32) and its cast to the output dtype: two launches
        bounds["split_sum_us"] = model.memory_us(card, partial + 4 * rows * cols) + model.memory_us(card, 6 * rows * cols)
        estimate += bounds["split_sum_us"]
    # The launch's own split (the compiled stand-in splits in 2 or not at all: the same code).
    return estimate, bounds, dict(constexprs, SPLIT_K=split, registers=code.registers, local_bytes=code.local_bytes,
                                  shared_bytes=code.shared_bytes, blocks_per_sm=code.blocks_per_sm)


def rows_for(model, card: str) -> list[dict]:
    out = []
    for name, (num_experts, top_k, projections) in MODELS.items():
        for phase, token_counts in TOKENS.items():
            for tokens in token_counts:
                rows, counts = routing(tokens, num_experts, top_k)
                for projection, (n, k) in projections.items():
                    for direction, transpose_weight in (("forward", True), ("backward", False)):
                        if phase == "decode" and not transpose_weight:
                            continue  # decoding has no backward
                        r, cols = (k, n) if transpose_weight else (n, k)
                        ours, bounds, config = grouped_4bit_us(model, card, counts, num_experts, n, k, transpose_weight)
                        grouped = model.grouped_gemm_us(card, counts, cols, r)
                        per_expert = sum(model.gemm_us(card, c, cols, r) for c in counts)
                        dequant = model.dequantize_us(card, n, k, len(counts), BLOCKSIZE) + grouped
                        out.append(dict(
                            arch=model.cards[card].arch, card=card, model=name, projection=projection, shape=[num_experts, n, k],
                            direction=direction, phase=phase, tokens=tokens, rows=rows, active_experts=len(counts),
                            grouped_4bit_us=round(ours, 2), bf16_grouped_mm_us=round(grouped, 2),
                            bf16_per_expert_cublas_us=round(per_expert, 2), dequant_bf16_grouped_us=round(dequant, 2),
                            vs_bf16_grouped_mm=round(grouped / ours, 2), vs_bf16_per_expert=round(per_expert / ours, 2),
                            vs_dequant_bf16_grouped=round(dequant / ours, 2),
                            bounds_us={key: round(v, 2) if isinstance(v, float) else v for key, v in bounds.items()},
                            config=config))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the H100 only")
    parser.add_argument("--out", default=None, help="results path (default benchmarks/results/moe-kernels-static.json)")
    parser.add_argument("--workers", type=int, default=1, help="compiling processes")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = machine_code_model()
    cards = ("H100",) if args.quick else tuple(model.cards)
    keys = []
    for card, (e, top_k, projections), tokens, transpose in itertools.product(
            cards, MODELS.values(), [t for counts in TOKENS.values() for t in counts], (True, False)):
        rows = routing(tokens, e, top_k)[0]
        for n, k in projections.values():
            split = launch_plan(model, card, rows, e, n, k, transpose)["split"] > 1
            keys.append(compile_key(model.cards[card].arch, rows, e, transpose, split))
    compile_missing(keys, args.workers, compile_one, _CODE)
    rows = [row for card in cards for row in rows_for(model, card)]
    print_table([dict(row, proj=row["projection"], dir=row["direction"][:3]) for row in rows],
                ["card", "model", "proj", "dir", "tokens", "rows", "active_experts", "grouped_4bit_us",
                 "bf16_grouped_mm_us", "bf16_per_expert_cublas_us", "dequant_bf16_grouped_us", "vs_bf16_grouped_mm",
                 "vs_bf16_per_expert"])
    defects = [row for row in rows if row["config"]["local_bytes"] or row["config"]["blocks_per_sm"] < 1]
    result = {"method": "benchmarks/moe_kernels_static.py docstring; the model's: " + model.method,
              "estimates": "machine-code model, not measured on a GPU",
              "calibration": "see benchmarks/results/calibration.json (held-out error of the model)",
              "parameters": model.calibration,
              "cards": {card: vars(model.cards[card]) for card in cards}, "versions": versions("triton"),
              "blocksize": BLOCKSIZE, "double_quant": True, "launch_defects": defects, "rows": rows}
    path = write_results("moe-kernels-static" + ("-quick" if args.quick else ""), result,
                         path=Path(args.out) if args.out else None)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
