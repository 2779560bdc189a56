"""The LLM.int8 Triton kernels on a machine without a GPU: what they compile to for sm_80/89/90
(registers, spills, shared memory, blocks per SM, int8 MMAs), and a roofline estimate of their time
on an H100 next to bf16 F.linear and dequantize + cuBLAS, at a Llama projection (4096x4096).

    python benchmarks/int8_kernels_static.py [--archs 80,89,90]

Kept apart from kernels_static.py (the 4-bit kernels). The estimate is DESIGN.md's model without
a Triton efficiency factor: time = max(bytes / 3.0 TB/s, ops / peak) + 5 us per launch, peaks as
achieved by cuBLAS (bf16 790 TFLOP/s; int8 2x that, the H100's dense int8 rate being 2x its bf16).
It ranks designs; it is not a measurement. Writes benchmarks/results/int8-kernels-static.json.
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import print_table, versions, write_results

N = K = 4096
HBM = 3.0e12  # bytes/s achieved on an H100 SXM
BF16_PEAK = 790e12  # FLOP/s achieved by cuBLAS
INT8_PEAK = 2 * BF16_PEAK  # int8 tensor-core rate is 2x bf16 (1979 vs 989 TOPS spec)
LAUNCH = 5e-6  # per kernel launch, CUDA-graph-free


def estimate(m: int, threshold: bool) -> dict:
    """Seconds for Y = X W^T at M rows: our int8 path, bf16 F.linear, dequantize + cuBLAS."""
    ops = 2 * m * N * K
    # ours: quantize rows (read X bf16, write CA int8), int8 GEMM (read CA, W int8, write Y bf16)
    quant_rows = max(m * K * 3 / HBM, 0) + LAUNCH
    # outlier columns: |X| >= t reduction + nonzero (a host sync) + two small gathers: 4 launches
    outliers = (m * K * 2 / HBM + 4 * LAUNCH) if threshold else 0.0
    gemm = max((m * K + N * K + m * N * 2) / HBM, ops / INT8_PEAK) + LAUNCH
    bf16 = max((m * K * 2 + N * K * 2 + m * N * 2) / HBM, ops / BF16_PEAK) + LAUNCH
    dequant = (N * K * 1 + N * K * 2) / HBM + LAUNCH
    return {"M": m, "int8 (ours)": quant_rows + outliers + gemm, "bf16 F.linear": bf16,
            "dequant + cuBLAS": dequant + bf16}


def compile_all(arch: int):
    import qlora
    from qlora.kernels import launch
    from qlora.kernels.int8.dequantize import int8_dequantize_triton
    from qlora.kernels.int8.matmul import int8_linear_triton

    weight = qlora.Weight8bit.quantize(torch.randn(N, K) * 0.02)
    with launch.compile_only(arch) as compiled:
        int8_dequantize_triton(weight.codes, weight.scb, torch.bfloat16)
        for m in (1, 256):
            a = torch.randn(m, K, dtype=torch.bfloat16)
            a[0, 0] = 20.0  # one outlier column: the fused outlier loop is compiled in
            int8_linear_triton(a, weight.codes, weight.scb, None, 6.0)
    return compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,89,90")
    args = parser.parse_args()
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK, machine_code

    static = []
    for arch in (int(a) for a in args.archs.split(",")):
        for launched in compile_all(arch):
            code = machine_code(launched.kernel, arch)
            static.append({"arch": f"sm_{arch}", "kernel": launched.name,
                           "tile": "x".join(str(launched.constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
                                            if k in launched.constexprs),
                           "registers": code.registers, "local_bytes": code.local_bytes,
                           "shared_bytes": code.shared_bytes, "shared_limit": MAX_SHARED_PER_BLOCK[arch],
                           "blocks_per_sm": code.blocks_per_sm, "int8_mmas": code.count(("IMMA", "IGMMA")),
                           "fp_mmas": code.count(("HMMA", "HGMMA"))})
        print(f"compiled for sm_{arch}", file=sys.stderr)
    print_table(static, ["arch", "kernel", "tile", "registers", "local_bytes", "shared_bytes", "blocks_per_sm",
                         "int8_mmas", "fp_mmas"])
    model = []
    for m in (1, 16, 256, 4096):
        for threshold in (False, True):
            row = estimate(m, threshold)
            model.append({"M": m, "threshold": 6.0 if threshold else 0.0,
                          **{k: round(v * 1e6, 1) for k, v in row.items() if k != "M"}})
    print("\nH100 roofline estimate, microseconds, Y = X W^T at 4096x4096 (bf16 X):")
    print_table(model, ["M", "threshold", "int8 (ours)", "bf16 F.linear", "dequant + cuBLAS"])
    write_results("int8-kernels-static", {"shape": [N, K], "activations": "bfloat16", "versions": versions("triton"),
                                          "static": static, "estimate_us": model,
                                          "model": {"hbm": HBM, "bf16_peak": BF16_PEAK, "int8_peak": INT8_PEAK,
                                                    "launch_s": LAUNCH}})


if __name__ == "__main__":
    main()
