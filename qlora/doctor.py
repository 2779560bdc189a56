"""`qlora doctor`: verify and measure the kernels on this machine (4-bit, LLM.int8, GPTQ, 8-bit
AdamW), and write what was found.

- prints the environment: torch, CUDA, triton and transformers versions, the GPU, its compute
  capability, shared memory per block and registers per SM;
- runs every kernel's self-check (qlora.kernels.selfcheck) and prints PASS/FAIL per path and dtype:
  on a GPU on the GPU (bf16, fp16, fp32), on a CPU under the Triton interpreter in a child process
  (fp32, fp16: the interpreter has no bf16 arithmetic);
- on a GPU times each path against bf16 F.linear (and bitsandbytes when installed) at the
  Llama-3-8B projections with CUDA events, beside the machine-code model's predictions for its arch
  (benchmarks/kernels_static.py); on a CPU prints the predictions alone;
- reports the CPU path: which one runs (the C kernels built for this CPU, or the PyTorch reference
  and why), its bit-exactness checks against the twins (fp32, bf16, fp16), and its speed here: a
  4096x4096 NF4 + double quant dequantize and a 2048x2048 layer's forward + backward against the
  twin, dense F.linear and bitsandbytes' CPU backend when installed (median ms, this machine);
- writes benchmarks/results/doctor-<gpu or cpu>.json (or `out=`);
- exits 1 if any check fails.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

# Every registered self-check: the 4-bit paths, LLM.int8's, GPTQ's, the grouped 4-bit experts kernel and the
# 8-bit AdamW step.
PATHS = ("dequantize", "gemv", "fused", "int8_dequantize", "int8_matmul", "gptq_dequantize", "gptq_fused", "gptq_gemv",
         "moe_grouped", "adamw8bit")
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
TIMED_M = (1, 16, 256, 4096)


def environment() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": version("triton"), "transformers": version("transformers"), "bitsandbytes": version("bitsandbytes"),
           "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                      "multiprocessors": props.multi_processor_count,
                      "shared_memory_per_block_optin": getattr(props, "shared_memory_per_block_optin", None),
                      "registers_per_multiprocessor": getattr(props, "regs_per_multiprocessor", None),
                      "memory_gb": round(props.total_memory / 2**30, 1)}
    return env


def run_checks(device: torch.device, dtypes, paths=PATHS) -> dict:
    """{"<path> <dtype>": {"pass": bool, "detail": str}} for every path, run here."""
    from qlora.kernels import selfcheck
    from qlora.kernels.moe import selfcheck as _moe_checks  # noqa: F401  (registers moe_grouped: no layer imports it yet)

    out = {}
    for path in paths:
        for dtype in dtypes:
            start = time.perf_counter()
            try:
                ok, detail = selfcheck.CHECKS[path](device, dtype)
            except Exception as error:  # a kernel that cannot run is a failed check
                ok, detail = False, f"{type(error).__name__}: {error}"
            out[f"{path} {str(dtype).removeprefix('torch.')}"] = {
                "pass": bool(ok), "detail": detail, "ms": round((time.perf_counter() - start) * 1e3, 1)}
    return out


def interpreter_checks() -> dict:
    """The checks on CPU under the Triton interpreter, in a child (the interpreter is chosen when
    triton first decorates a kernel, so this process cannot switch to it)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "QLORA_BACKEND": "triton"}
    code = ("import json, torch; from qlora.doctor import run_checks; "
            "print(json.dumps(run_checks(torch.device('cpu'), (torch.float32, torch.float16))))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200,
                            cwd=Path(__file__).parent)  # not the repository root: its kernels/ folder would shadow
    if result.returncode != 0:
        return {"interpreter": {"pass": False, "detail": result.stderr.strip()[-2000:]}}
    return json.loads(result.stdout.strip().splitlines()[-1])


CPU_CHECKS = ("cpu_dequantize", "cpu_int8_dequantize", "cpu_gptq_dequantize", "cpu_quantize", "cpu_adamw8bit")


def cpu_path() -> dict:
    """Which CPU path runs for CPU tensors, and why."""
    from qlora.kernels import native
    from qlora.kernels.backend import get_backend
    from qlora.kernels.nf4 import cpu as nf4_cpu

    backend = get_backend()
    built = nf4_cpu.available()
    if backend == "torch":
        runs = "the PyTorch reference (QLORA_BACKEND=torch)"
    elif built:
        runs = f"the C kernels, built with {native.compiler()} for this CPU ({torch.backends.cpu.get_cpu_capability()})"
    else:
        runs = f"the PyTorch reference ({'; '.join(native.failures().values()) or 'the C kernels could not be built'})"
    return {"backend": backend, "built": built, "runs": runs, "threads": torch.get_num_threads()}


def time_cpu(repeats: int = 5, size: int = 4096, layer_size: int = 2048, rows: int = 256) -> dict:
    """Median ms on this CPU: a size x size dequantize and a layer_size layer's forward + backward on
    `rows` rows, the CPU path against the twin, dense F.linear and bitsandbytes (when installed)."""
    import logging
    import statistics

    import torch.nn.functional as F

    from qlora.kernels.backend import set_backend
    from qlora.kernels.nf4 import cpu as nf4_cpu, reference
    from qlora.kernels.nf4.linear import linear_4bit
    from qlora.quant import quantize_4bit

    def median_ms(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(1e3 * statistics.median(times), 2)

    torch.manual_seed(0)
    big = torch.randn(size, size, dtype=torch.bfloat16)
    dequantize_case, layer_case = f"dequantize {size}x{size} nf4+dq bf16", \
        f"layer {layer_size}x{layer_size} M={rows} bf16 forward+backward"
    packed, state = quantize_4bit(big, "nf4", 64, True)
    weight = state.packed_view(packed)
    out = {dequantize_case: {"twin": median_ms(lambda: reference.dequantize_4bit_torch(weight, torch.bfloat16))}}
    if nf4_cpu.available():
        out[dequantize_case]["cpu path"] = median_ms(lambda: nf4_cpu.dequantize_4bit_cpu(weight, torch.bfloat16))
    layer_weight = torch.randn(layer_size, layer_size) * 0.02
    packed, state = quantize_4bit(layer_weight, "nf4", 64, True)
    small = state.packed_view(packed)
    x = torch.randn(rows, layer_size, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(rows, layer_size, dtype=torch.bfloat16)
    dense = layer_weight.to(torch.bfloat16)

    def step(fn):
        def run():
            fn(x).backward(grad)
            x.grad = None
        return run

    def on(backend):
        def run():
            set_backend(backend)
            try:
                linear_4bit(x, small).backward(grad)
            finally:
                set_backend(None)
            x.grad = None
        return run

    layer = {"twin": median_ms(on("torch")), "dense F.linear": median_ms(step(lambda a: F.linear(a, dense)))}
    if nf4_cpu.available():
        layer["cpu path"] = median_ms(on("cpu"))
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb

        p, s = bnb.functional.quantize_4bit(big, blocksize=64, quant_type="nf4", compress_statistics=True)
        out[dequantize_case]["bitsandbytes"] = median_ms(lambda: bnb.functional.dequantize_4bit(p, s))
        p, s = bnb.functional.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
        layer["bitsandbytes"] = median_ms(step(lambda a: bnb.matmul_4bit(a, p.t(), s)))
    except ImportError:
        pass
    out[layer_case] = layer
    out.update(time_cpu_quantize_and_optimizer(median_ms, layer_weight))
    return out


def time_cpu_quantize_and_optimizer(median_ms, weight: torch.Tensor) -> dict:
    """The NF4 + DQ quantize of `weight` and one 8-bit AdamW step over as many fp32 parameters: the
    CPU path against the twin, bitsandbytes (when installed) and, for the step, torch's fused AdamW."""
    from qlora.kernels.backend import set_backend
    from qlora.optim import PagedAdamW8bit
    from qlora.quant import quantize_4bit

    def on(backend, fn):
        def run():
            set_backend(backend)
            try:
                fn()
            finally:
                set_backend(None)
        return run

    def stepper(make):
        param = torch.nn.Parameter(weight.float().clone())
        param.grad = torch.randn_like(param) * 1e-3
        return make([param]).step

    size = "x".join(map(str, weight.shape))
    quantize = lambda: quantize_4bit(weight, "nf4", 64, True)  # noqa: E731
    rows = {f"quantize {size} nf4+dq fp32": {"twin": median_ms(on("torch", quantize)), "cpu path": median_ms(on("cpu", quantize))},
            f"8-bit AdamW step {weight.numel() / 1e6:.2g}M fp32": {
                "twin": median_ms(on("torch", stepper(PagedAdamW8bit))),
                "cpu path": median_ms(on("cpu", stepper(PagedAdamW8bit))),
                "torch AdamW fused (32-bit)": median_ms(stepper(lambda p: torch.optim.AdamW(p, fused=True)))}}
    try:
        import bitsandbytes as bnb

        rows[f"quantize {size} nf4+dq fp32"]["bitsandbytes"] = median_ms(
            lambda: bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True))
        rows[f"8-bit AdamW step {weight.numel() / 1e6:.2g}M fp32"]["bitsandbytes"] = median_ms(stepper(bnb.optim.AdamW8bit))
    except ImportError:
        pass
    return rows


def predictions(arch: int) -> dict:
    """The model's forward estimates for sm_<arch> (or the nearest older arch modelled)."""
    from qlora.kernels.nf4.dispatch_table import PREDICTIONS

    from qlora.kernels.nf4.ops import modelled_arch

    if not PREDICTIONS:
        return {"arch": arch, "us": {}}
    chosen = modelled_arch(PREDICTIONS, arch)
    return {"arch": chosen, "us": PREDICTIONS[chosen]}


def time_paths(repeats: int = 20) -> list:
    """Forward microseconds per path at the Llama shapes on this GPU (CUDA events, median)."""
    import torch.nn.functional as F

    from qlora.kernels.nf4 import ops
    from qlora.kernels.backend import set_backend
    from qlora.quant import quantize_4bit

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return round(sorted(times)[len(times) // 2], 2)

    rows = []
    set_backend("triton")
    try:
        for name, (n, k) in SHAPES.items():
            dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            packed, state = quantize_4bit(dense, "nf4", 64, True)
            weight = state.packed_view(packed)
            if bnb is not None:
                bnb_weight, bnb_state = bnb.functional.quantize_4bit(dense, blocksize=64, quant_type="nf4",
                                                                     compress_statistics=True)
            for m in TIMED_M:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"shape": name, "M": m, "N": n, "K": k, "bf16": timed(lambda: F.linear(x, dense))}
                for path in ("gemv", "fused", "dequant_matmul"):
                    if path == "gemv" and m > 64:
                        continue
                    row[path] = timed(lambda: ops.matmul(x, weight, None, True, path))
                if bnb is not None:
                    row["bitsandbytes"] = timed(lambda: bnb.matmul_4bit(x, bnb_weight.t(), bnb_state))
                rows.append(row)
            del dense, packed, weight
    finally:
        set_backend(None)
    return rows


def doctor(out: str | None = None) -> int:
    env = environment()
    print("environment")
    for key, value in env.items():
        print(f"  {key}: {value}")
    on_gpu = env["gpu"] is not None
    if on_gpu:
        from qlora.kernels.backend import set_backend

        set_backend("triton")
        try:
            checks = run_checks(torch.device("cuda"), (torch.bfloat16, torch.float16, torch.float32))
        finally:
            set_backend(None)
        major, minor = torch.cuda.get_device_capability(0)
        arch = 10 * major + minor
    else:
        print("\nno CUDA GPU: the kernels run under the Triton interpreter (fp32, fp16)")
        checks = interpreter_checks()
        arch = 90
    print("\nself-checks")
    for name, result in checks.items():
        print(f"  {'PASS' if result['pass'] else 'FAIL'}  {name:20} {result.get('ms', 0):8.1f} ms"
              + ("" if result["pass"] else f"  ({result['detail']})"))
    cpu = cpu_path()
    cpu["checks"] = run_checks(torch.device("cpu"), (torch.float32, torch.bfloat16, torch.float16), CPU_CHECKS) \
        if cpu["built"] else {}
    print(f"\nCPU path: {cpu['runs']}, {cpu['threads']} threads")
    for name, result in cpu["checks"].items():
        print(f"  {'PASS' if result['pass'] else 'FAIL'}  {name:28} {result.get('ms', 0):8.1f} ms"
              + ("" if result["pass"] else f"  ({result['detail']})"))
    cpu["timings_ms"] = time_cpu()
    for case, row in cpu["timings_ms"].items():
        print(f"  {case}: " + ", ".join(f"{impl} {ms:.1f} ms" for impl, ms in row.items()))
    model = predictions(arch)
    timings = time_paths() if on_gpu else []
    print(f"\nmodel predictions, sm_{model['arch']} (us, forward, NF4 + double quant, blocksize 64;"
          " benchmarks/kernels_static.py)" + (", measured beside them" if timings else ""))
    measured = {(row["shape"], row["M"]): row for row in timings}
    print(f"  {'shape':10} {'M':>5} " + " ".join(f"{p:>16}" for p in ("bf16", "gemv", "fused", "dequant_matmul")))
    for key, row in model["us"].items():
        shape, m = key.split(" M=")
        got = measured.get((shape, int(m)), {})
        cells = []
        for p in ("bf16", "gemv", "fused", "dequant_matmul"):
            predicted = row.get(p)
            cell = "-" if predicted is None else f"{predicted:.1f}"
            if p in got:
                cell += f" / {got[p]:.1f}"
            cells.append(f"{cell:>16}")
        print(f"  {shape:10} {m:>5} " + " ".join(cells))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", env["gpu"]["name"]) if on_gpu else "cpu"
    path = Path(out) if out else Path("benchmarks") / "results" / f"doctor-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    failed = [n for n, r in {**checks, **cpu["checks"]}.items() if not r["pass"]]
    payload = {"environment": env, "checks": checks, "cpu": cpu, "model": model, "timings_us": timings, "failed": failed}
    staged = path.with_suffix(".json.tmp")
    staged.write_text(json.dumps(payload, indent=2) + "\n")
    staged.replace(path)  # never a half-written report
    print(f"\nwrote {path}" + (f"\n{len(failed)} check(s) FAILED: {', '.join(failed)}" if failed else "\nall checks passed"))
    if on_gpu:
        print("Please share this file (an issue or discussion on the project): it is how the kernels are "
              "verified and tuned on GPUs the project has no access to.")
    return 1 if failed else 0
