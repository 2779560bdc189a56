"""The LLM.int8 Triton kernels on a machine without a GPU: what they compile to for sm_80/86/89/90
(registers, spills, shared memory, blocks per SM, int8 MMAs), and their time in the one machine-code
model (benchmarks/gpu_model.py) next to bf16 cuBLAS and dequantize + cuBLAS, at a Llama projection
(4096x4096), on every card.

    python benchmarks/int8_kernels_static.py [--archs 80,86,89,90]

Kept apart from kernels_static.py (the 4-bit kernels), on the same rules and calibrated parameters
(gpu_model's docstring): each launch is compiled through its real launcher and timed from its SASS
(busiest-SM rounds, per-unit issue, shared memory, int8 tensor cores at the card's int8 rate, the
loop's dependency chain, DRAM latency by prefetch distance, DRAM bandwidth, a fixed cost per kernel).
Our int8 path is: quantize the rows (one program per row, ceil(K / BLOCK_K) trips), with a threshold
the outlier search done by torch (|X| >= t reduced over rows, nonzero, two gathers: modelled as their
bytes plus four fixed costs; the host sync of nonzero is not modelled), then the int8 GEMM (GROUP_M row
tiles share a weight tile in L2). Writes benchmarks/results/int8-kernels-static.json; the estimates
are labelled with the calibration's held-out error (benchmarks/results/calibration.json).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_model  # noqa: E402
from common import print_table, versions, write_results  # noqa: E402

N = K = 4096
MS = (1, 16, 256, 4096)


def compile_all(arch: int) -> dict:
    """{(kernel name, M): CompiledLaunch} of the int8 launches at 4096x4096, M = 1 .. 4096, with outliers."""
    import qlora
    from qlora.kernels import launch
    from qlora.kernels.int8.dequantize import int8_dequantize_triton
    from qlora.kernels.int8.matmul import int8_linear_triton

    weight = qlora.Weight8bit.quantize(torch.randn(N, K) * 0.02)
    out = {}
    with launch.compile_only(arch) as compiled:
        int8_dequantize_triton(weight.codes, weight.scb, torch.bfloat16)
    out[("_int8_dequantize_kernel", 0)] = compiled[0]
    for m in MS:
        a = torch.randn(m, K, dtype=torch.bfloat16)
        a[0, 0] = 20.0  # one outlier column: the fused outlier loop is compiled in
        with launch.compile_only(arch) as compiled:
            int8_linear_triton(a, weight.codes, weight.scb, None, 6.0)
        for launched in compiled:
            out[(launched.name, m)] = launched
    return out


def estimate(card: str, codes: dict, m: int, threshold: bool) -> dict:
    """Modelled microseconds for Y = X W^T at M rows: our int8 path, bf16 cuBLAS, dequantize + cuBLAS."""
    from qlora.kernels.int8.dequantize import BLOCK_COLS, BLOCK_ROWS

    rows = codes[("_int8_quantize_rows_kernel", m)]
    block_k = rows.constexprs["BLOCK_K"]
    quantize = gpu_model.kernel_time(rows.code, card, m, math.ceil(K / block_k), 2 * m * K + m * K + 4 * m)
    outliers = (gpu_model.bandwidth_us(card, 2 * m * K + m * K) + 3 * gpu_model.PARAMETERS["fixed_us"]) if threshold else 0.0
    gemm = codes[("_int8_matmul_kernel", m)]
    c = gemm.constexprs
    tiles_m = math.ceil(m / c["BLOCK_M"])
    programs = tiles_m * math.ceil(N / c["BLOCK_N"])
    matmul = gpu_model.kernel_time(gemm.code, card, programs, math.ceil(K / c["BLOCK_K"]),
                                   N * K * math.ceil(tiles_m / c["GROUP_M"]) + m * K + 2 * m * N + 4 * N)
    dequantize_code = codes[("_int8_dequantize_kernel", 0)].code
    dequantize = gpu_model.kernel_time(dequantize_code, card, math.ceil(N / BLOCK_ROWS) * math.ceil(K / BLOCK_COLS), 1,
                                       N * K + 2 * N * K + 4 * N)
    bf16 = gpu_model.cublas_time(card, m, N, K)["estimate_us"]
    ours = quantize["estimate_us"] + outliers + matmul["estimate_us"]
    return {"int8 (ours)": ours, "bf16 cuBLAS": bf16, "dequant + cuBLAS": dequantize["estimate_us"] + bf16,
            "int8 GEMM bound": matmul["breakdown"]["bound"]}


class _Launch:
    def __init__(self, launched, code):
        self.constexprs, self.code = launched.constexprs, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,86,89,90")
    args = parser.parse_args()
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK, machine_code

    static, model = [], []
    for arch in (int(a) for a in args.archs.split(",")):
        codes = {}
        for key, launched in compile_all(arch).items():
            code = machine_code(launched.kernel, arch)
            codes[key] = _Launch(launched, code)
            static.append({"arch": f"sm_{arch}", "kernel": launched.name, "M": key[1],
                           "tile": "x".join(str(launched.constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
                                            if k in launched.constexprs),
                           "registers": code.registers, "local_bytes": code.local_bytes,
                           "shared_bytes": code.shared_bytes, "shared_limit": MAX_SHARED_PER_BLOCK[arch],
                           "blocks_per_sm": code.blocks_per_sm, "int8_mmas": code.count(("IMMA", "IGMMA")),
                           "fp_mmas": code.count(("HMMA", "HGMMA"))})
        print(f"compiled for sm_{arch}", file=sys.stderr)
        for card in (name for name, spec in gpu_model.CARDS.items() if spec.arch == arch):
            for m in MS:
                for threshold in (False, True):
                    row = estimate(card, codes, m, threshold)
                    model.append({"card": card, "M": m, "threshold": 6.0 if threshold else 0.0,
                                  **{k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()},
                                  "vs bf16": f"{row['bf16 cuBLAS'] / row['int8 (ours)']:.2f}x"})
    print_table(static, ["arch", "kernel", "M", "tile", "registers", "local_bytes", "shared_bytes", "blocks_per_sm",
                         "int8_mmas", "fp_mmas"])
    calibration = gpu_model.CALIBRATION
    error = json.loads(calibration.read_text())["held_out_median_abs_error"] if calibration.exists() else None
    label = f"calibration error {error:.0%} median, held out" if error is not None else "uncalibrated"
    print(f"\nModel estimate ({label}), microseconds, Y = X W^T at 4096x4096 (bf16 X):")
    print_table(model, ["card", "M", "threshold", "int8 (ours)", "bf16 cuBLAS", "dequant + cuBLAS", "vs bf16",
                        "int8 GEMM bound"])
    write_results("int8-kernels-static", {"shape": [N, K], "activations": "bfloat16", "versions": versions("triton"),
                                          "method": "benchmarks/int8_kernels_static.py docstring; benchmarks/gpu_model.py docstring",
                                          "parameters": gpu_model.PARAMETERS, "held_out_calibration_error": error,
                                          "static": static, "estimate_us": model})


if __name__ == "__main__":
    main()
