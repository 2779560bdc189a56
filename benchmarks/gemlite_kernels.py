"""gemlite's Triton 4-bit kernels compiled through this project's compile-only path, so the machine-code
model (benchmarks/gpu_model.py) can time them by the same rules as ours; gemlite's authors publish
their speed-ups per GPU (benchmarks/results/published-kernels.json), which is what calibrates the model.

gemlite is a benchmark peer, not a dependency (`pip install qlora[bench]`). Its package queries the CUDA
device when imported (gemlite/triton_kernels/utils.py reads the compute capability and SM count at
module level), so on a machine without a GPU it cannot be imported. This module copies the five
source files the kernels need (dtypes, config, utils and the three A16W4 kernels) into a private
package, with those three module-level device queries replaced by the modelled card's values, and
imports that copy; the installed gemlite is never modified. Each launch uses the configuration
gemlite itself tuned for the card (gemlite/configs/<card>.json; its RTX 4090 file for the RTX 3090,
which has none). The kernel is the one gemlite's own launcher picks today (GEMV_REVSPLITK for M <= 4,
GEMM_SPLITK below 64 rows, GEMM from 64: gemlite.core.get_matmul_type), accumulating in fp32 (today's
default), unless a caller asks for another: the published plots were drawn in October 2024 by a
gemlite that timed several kernels per M and ran the fastest (published_candidates), accumulating fp16
products in fp16.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

CONFIG_FILES = {"H100": "h100.json", "A100": "a100.json", "RTX 4090": "4090.json", "RTX 3090": "4090.json",
                "L4": "l4.json", "A10": "a100.json"}
_PACKAGE = "qlora_bench_gemlite"
GROUP_SIZE = 128
ELEMENTS_PER_WORD = 8  # 4-bit values per int32


def installed() -> Path | None:
    spec = importlib.util.find_spec("gemlite")
    return Path(spec.origin).parent if spec and spec.origin else None


def _load(sms: int):
    """The private copy of gemlite's kernel modules (imported once per process)."""
    if _PACKAGE in sys.modules:
        return sys.modules[_PACKAGE]
    source = installed()
    if source is None:
        raise RuntimeError("gemlite is not installed: pip install 'qlora[bench]' (or pip install gemlite)")
    root = Path(tempfile.mkdtemp(prefix="gemlite-copy-"))
    package = root / _PACKAGE
    (package / "triton_kernels").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "triton_kernels" / "__init__.py").write_text("")
    (package / "dtypes.py").write_text((source / "dtypes.py").read_text())
    (package / "core.py").write_text("GEMLITE_TRITON_CONFIG_CACHE = {}\nGEMLITE_USE_TMA = False\n")
    for name in ("config", "gemv_revsplitK_kernels", "gemm_splitK_kernels", "gemm_kernels"):
        text = (source / "triton_kernels" / f"{name}.py").read_text()
        (package / "triton_kernels" / f"{name}.py").write_text(text)
    utils = (source / "triton_kernels" / "utils.py").read_text()
    replacements = {
        "GPU_COMPUTE_CAPABILITY = torch.cuda.get_device_capability()[0]": "GPU_COMPUTE_CAPABILITY = 8",
        'NUM_SMS = torch.cuda.get_device_properties("cuda").multi_processor_count': f"NUM_SMS = {sms}",
        "IS_HIP = is_hip()": "IS_HIP = False",
    }
    for old, new in replacements.items():
        if old not in utils:
            raise RuntimeError(f"this gemlite version's triton_kernels/utils.py has no line {old!r}; "
                               "the benchmark knows gemlite 0.6")
        utils = utils.replace(old, new)
    (package / "triton_kernels" / "utils.py").write_text(utils)
    sys.path.insert(0, str(root))
    return importlib.import_module(_PACKAGE)


def matmul_type(m: int) -> str:
    """gemlite.core.get_matmul_type for 4-bit weights: the one kernel today's gemlite runs at m rows."""
    return "GEMV_REVSPLITK" if m <= 4 else "GEMM_SPLITK" if m < 64 else "GEMM"


def published_candidates(m: int) -> tuple[str, ...]:
    """The kernels gemlite's published plots chose among at m rows. Its benchmark
    (examples/benchmark_triton.py at 39c74ff, October 2024, matmul_type "AUTO") timed every kernel
    its warm-up allowed and ran the fastest: GEMV_REVSPLITK up to 2 rows, GEMM_SPLITK up to 32, GEMM
    from 16 (gemlite/core.py `warmup` at that commit). Its plain GEMV kernel (1 row) is not compiled
    here, so at M = 1 the modelled choice can only be slower than the plotted one."""
    kinds = []
    if m <= 2:
        kinds.append("GEMV_REVSPLITK")
    if m <= 32:
        kinds.append("GEMM_SPLITK")
    if m >= 16:
        kinds.append("GEMM")
    return tuple(kinds)


def tuned_config(card: str, m: int, n: int, k: int, kind: str | None = None) -> dict:
    """gemlite's tuned configuration for this card and problem: its own file's entry for (M bucket, N, K),
    falling back to the nearest tuned shape (its files tune 4096 x 4096 for 4-bit)."""
    from_file = json.loads((installed() / "configs" / CONFIG_FILES[card]).read_text())[kind or matmul_type(m)]
    utils = sys.modules[f"{_PACKAGE}.triton_kernels.utils"]
    bucket = utils.get_closest_m(m)
    wanted = (bucket, n, k, GROUP_SIZE, ELEMENTS_PER_WORD, 104)  # type_id 104: fp16 activations, 4 bits
    candidates = {tuple(int(v) for v in key.strip("()").split(",")): value for key, value in from_file.items()}
    same = [key for key in candidates if key[3:] == wanted[3:]]
    if not same:
        raise RuntimeError(f"gemlite has no tuned 4-bit group-128 {kind or matmul_type(m)} configuration for {card}")
    best = min(same, key=lambda key: (abs(math.log2(key[0] / bucket)), abs(math.log2(key[1] * key[2] / (n * k)))))
    return dict(candidates[best])


def compile_launch(card: str, arch: int, sms: int, m: int, n: int, k: int, kind: str | None = None,
                   accumulate: str = "fp32"):
    """(MachineCode, programs, loop trips, DRAM bytes, config) of gemlite's launch for Y[m, n] = X[m, k] W^T
    (fp16, 4-bit group-128 asymmetric weights, as its published plots) compiled for sm_<arch>: the
    kernel `kind` (default: the one today's gemlite picks), accumulating in `accumulate` ("fp32", today's
    default; "fp16", the default of the October 2024 gemlite that drew the published plots)."""
    import torch
    import triton

    from qlora.kernels import launch
    from qlora.kernels.machine_code import machine_code

    _load(sms)
    modules = {name: importlib.import_module(f"{_PACKAGE}.triton_kernels.{name}")
               for name in ("gemv_revsplitK_kernels", "gemm_splitK_kernels", "gemm_kernels")}
    tl = triton.language
    kind = kind or matmul_type(m)
    config = tuned_config(card, m, n, k, kind)
    x = torch.empty(m, k, dtype=torch.float16)
    w = torch.empty(k // ELEMENTS_PER_WORD, n, dtype=torch.int32)
    scales = torch.empty(k // GROUP_SIZE, n, dtype=torch.float16)
    zeros = torch.empty(k // GROUP_SIZE, n, dtype=torch.float16)
    out = torch.empty(m, n, dtype=torch.float16)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    for extra in ("num_ctas", "num_buffers_warp_spec", "num_consumer_groups", "reg_dec_producer", "reg_inc_consumer"):
        config.pop(extra, None)
    common = dict(input_dtype=tl.float16, output_dtype=tl.float16, acc_dtype={"fp32": tl.float32, "fp16": tl.float16}[accumulate], meta_dtype=tl.float16,
                  channel_scale_mode=0, W_group_mode=3, zero_is_scalar=False, data_contiguous=True,
                  num_warps=warps, num_stages=stages)
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    if kind == "GEMV_REVSPLITK":
        kernel = modules["gemv_revsplitK_kernels"].gemv_INT_revsplitK_kernel
        grid = (math.ceil(m / bm) * math.ceil(n / bn), math.ceil(k / (bk * 2)))
        args = (x, w, out, scales, zeros, None, m, n, k, 4, GROUP_SIZE, 15, ELEMENTS_PER_WORD, 104, False,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1), 0, 0,
                scales.stride(0), scales.stride(1))
        extra = dict(EVEN_K=k % (bk * 2) == 0, EVEN_N=n % bn == 0, dump_b_val=0)
        trips = 1
        split = grid[1]
    else:
        module = modules["gemm_splitK_kernels" if kind == "GEMM_SPLITK" else "gemm_kernels"]
        kernel = module.gemm_INT_kernel if kind == "GEMM" else module.gemm_splitK_INT_kernel
        split = config.get("SPLIT_K", 1)
        grid = (math.ceil(m / bm) * math.ceil(n / bn), split) if kind == "GEMM_SPLITK" else (math.ceil(m / bm) * math.ceil(n / bn),)
        utils = sys.modules[f"{_PACKAGE}.triton_kernels.utils"]
        args = (x, w, out, scales, zeros, None, m, n, k, utils.get_closest_m(m), 4, GROUP_SIZE, 15, ELEMENTS_PER_WORD,
                104, 2, 4, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1), 0, 0,
                scales.stride(0), scales.stride(1))
        config["NUM_STAGES"] = stages
        extra = dict(load_scales_as_block=False, use_tma=False, use_5d_scales=False, meta_scale_norm_ptr=None,
                     warp_specialize=False, EVEN_M=m % bm == 0, EVEN_N=n % bn == 0,
                     EVEN_K=k % (bk * split) == 0)
        trips = math.ceil(k / (bk * split))
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # past @autotune and @heuristics: the configuration is given, not searched
    names = {p.name for p in kernel.params}
    kwargs = {key: value for key, value in {**common, **config, **extra}.items()
              if key in names or key in ("num_warps", "num_stages")}
    with launch.compile_only(arch) as compiled:
        launch.launch(kernel, grid, *args, **kwargs)
    code = machine_code(compiled[0].kernel, arch)
    programs = math.prod(grid)
    return code, programs, trips, dram_bytes(kind, config, m, n, k), {"kernel": kind, "accumulate": accumulate,
                                                                      "num_warps": warps, "num_stages": stages,
                                                                      **config}


def dram_bytes(kind: str, config: dict, m: int, n: int, k: int) -> float:
    """Bytes one gemlite launch moves to and from DRAM: the 4-bit weight with its fp16 scales and zeros
    per group of 128, the activations, the output (each split-K slice adds its partial sums into it)."""
    weight = k * n / 2 + 2 * 2 * n * k / GROUP_SIZE
    # GEMV_REVSPLITK runs one program per row (BLOCK_SIZE_M = 1), all resident together: the rows'
    # programs of one weight block share it through L2, so DRAM serves it once. The GEMMs swizzle
    # GROUP_SIZE_M row tiles over one weight tile.
    tiles_m = math.ceil(m / config["BLOCK_SIZE_M"])
    rereads = 1 if kind == "GEMV_REVSPLITK" else math.ceil(tiles_m / max(1, config.get("GROUP_SIZE_M", 1)))
    split = math.ceil(k / (config["BLOCK_SIZE_K"] * 2)) if kind == "GEMV_REVSPLITK" else config.get("SPLIT_K", 1)
    return weight * rereads + 2 * m * k + 2 * m * n * split
