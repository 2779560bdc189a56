"""What each Triton kernel compiles to for a GPU, on a machine without one: registers, spills,
shared memory, resident blocks per SM, tensor-core MMAs and global-load instructions.

    python benchmarks/kernels_static.py [--archs 80,89,90] [--out PATH]

The kernels are compiled through their real launchers at a Llama projection shape (4096x4096
NF4 + double quant, bf16 activations) with qlora.kernels.launch.compile_only, and read back with
the cuobjdump/nvdisasm shipped in the triton wheel. These are static facts, not timings:
`loads/elem` is global-load instructions in the kernel text (SASS LDG + LDGSTS, prologue copies
of a pipelined loop included) per weight element a thread decodes in one tile: the decode's cost
in load-issue slots, which bounds a memory-bound kernel before DRAM bandwidth does when it is
above ~1. Writes benchmarks/results/kernels-static.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import print_table, versions, write_results

SHAPE = (4096, 4096)
CASES = (
    # (label, launcher, M, transpose_weight)
    ("dequantize", "dequantize", 0, True),
    ("gemv fwd M=1", "gemv", 1, True),
    ("gemv bwd M=1", "gemv", 1, False),
    ("gemv fwd M=16", "gemv", 16, True),
    ("fused fwd M=256", "fused", 256, True),
    ("fused bwd M=256", "fused", 256, False),
    ("adamw8bit", "adamw8bit", 0, True),
)


def compile_case(arch: int, launcher: str, m: int, transpose_weight: bool, weight, dtype=torch.bfloat16):
    from qlora.kernels import launch
    from qlora.kernels.adamw8bit import adamw8bit_update_triton
    from qlora.kernels.dequantize import dequantize_4bit_triton
    from qlora.kernels.gemv import gemv_4bit
    from qlora.kernels.matmul import matmul_4bit_fused
    from qlora.quant.codes import dynamic_map

    features = SHAPE[1] if transpose_weight else SHAPE[0]
    a = torch.randn(m, features, dtype=dtype) if m else None
    with launch.compile_only(arch) as compiled:
        if launcher == "dequantize":
            dequantize_4bit_triton(weight, dtype)
        elif launcher == "gemv":
            gemv_4bit(a, weight, transpose_weight=transpose_weight)
        elif launcher == "fused":
            matmul_4bit_fused(a, weight, transpose_weight=transpose_weight)
        else:
            n, blocks = 2**20, 2**20 // 256
            adamw8bit_update_triton(torch.randn(n), torch.randn(n, dtype=dtype), torch.zeros(n, dtype=torch.uint8),
                                    torch.ones(blocks), torch.zeros(n, dtype=torch.uint8), torch.ones(blocks),
                                    dynamic_map("cpu", signed=True), dynamic_map("cpu", signed=False), step=1,
                                    lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    return compiled[0]  # the main kernel (the GEMV's reduction is second)


def tile_elements(launched) -> int:
    c = launched.constexprs
    if "ELEMENTS" in c:
        return c["ELEMENTS"]
    if "BLOCK_N" in c:
        return c["BLOCK_N"] * c["BLOCK_R"]
    return c["BLOCKSIZE"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,89,90", help="CUDA architectures: 80 A100, 89 L4/RTX 4090, 90 H100/H200")
    parser.add_argument("--out", default=None, help="results path (default benchmarks/results/kernels-static.json)")
    args = parser.parse_args()

    import qlora
    from qlora.kernels.machine_code import GLOBAL_LOADS, MAX_SHARED_PER_BLOCK, TENSOR_CORE_MMAS, machine_code

    torch.manual_seed(0)
    packed, state = qlora.quantize_4bit(torch.randn(SHAPE) * 0.02, "nf4", 64, True)
    weight = state.packed_view(packed)
    rows = []
    for arch in (int(a) for a in args.archs.split(",")):
        for label, launcher, m, transpose_weight in CASES:
            start = time.perf_counter()
            launched = compile_case(arch, launcher, m, transpose_weight, weight)
            code = machine_code(launched.kernel, arch)
            threads = 32 * code.num_warps
            loads = code.count(GLOBAL_LOADS)
            elements = tile_elements(launched)
            rows.append({
                "arch": f"sm_{arch}", "kernel": label, "name": launched.name,
                "constexprs": {k: v for k, v in launched.constexprs.items() if k.isupper()},
                "registers": code.registers, "local_bytes": code.local_bytes, "shared_bytes": code.shared_bytes,
                "shared_limit": MAX_SHARED_PER_BLOCK.get(arch), "num_warps": code.num_warps,
                "blocks_per_sm": code.blocks_per_sm, "tensor_core_mmas": code.count(TENSOR_CORE_MMAS),
                "global_loads": loads, "tile_elements": elements,
                "loads_per_element": round(loads / (elements / threads), 3),
                "compile_s": round(time.perf_counter() - start, 2),
            })
            print(f"compiled {label} for sm_{arch}", file=sys.stderr)
    print_table(rows, ["arch", "kernel", "registers", "local_bytes", "shared_bytes", "blocks_per_sm",
                       "tensor_core_mmas", "global_loads", "loads_per_element"])
    write_results("kernels-static", {"shape": list(SHAPE), "quant": "nf4 blocksize 64, double quant",
                                     "activations": "bfloat16", "versions": versions("triton"), "rows": rows}, path=args.out)


if __name__ == "__main__":
    main()
