"""Everything a CUDA machine should check the day one appears, in one script (< 8 minutes on an H100).

    python benchmarks/gpu_check.py               # on a CUDA GPU: writes benchmarks/results/gpu-<card>.json
    python benchmarks/gpu_check.py --dry-run     # anywhere: the rows it would time, with the model's predictions

Steps, each with its own time limit so the whole run stays under 8 minutes:
1. the GPU tests (pytest on the test files that hold CUDA tests, -m "not slow"; 240 s);
2. `qlora doctor` (its kernel self-checks and timings; 120 s);
3. timings of every 4-bit path (gemv, fused (split-K where its tiles leave SMs idle: each fused row
   records its split_k), dequant_matmul, and what the dispatcher picks) against
   bf16 F.linear and bitsandbytes where installed, forward (Y = X W^T) and backward (dX = dY W), at
   the model's Llama-3-8B projections and M buckets: CUDA events, warm-up, median of --repeats, inputs
   rotated over fresh random tensors, L2 flushed before every call (benchmarks/kernels_gpu.Timer);
4. the model's prediction beside each measured row (benchmarks/results/kernels-static.json, this
   card's rows, or its arch's table card when the card is not modelled), and each row's error;
5. the refit: the model's parameters fitted again on the measured rows (this card's kernels compiled
   through the same path; coordinate descent over calibration.GRID), written beside the published fit;
6. the split sweep: the fused kernel at decode-sized M (SPLIT_MS) timed at every split it can run,
   beside the split its rule picks (matmul.fused_split) and the model's estimate of each: how much
   slower the rule's split is than the fastest measured one (`splits`: per case and its median and
   worst), the check of a rule fitted to the model alone.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_model  # noqa: E402
from common import versions, write_results  # noqa: E402

ROOT = Path(__file__).parents[1]
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
MS = (1, 4, 16, 64, 256, 1024, 4096)
PATHS = ("gemv", "fused", "dequant_matmul", "auto")
SPLIT_MS = (1, 16)  # decode-sized M: where fused_split chooses among splits by its cost
MAX_SPLIT = 64
GPU_TEST_FILES = ("tests/test_kernels.py", "tests/test_optim_kernels.py", "tests/test_doctor.py",
                  "tests/test_reliability.py", "tests/test_memory_options.py", "tests/test_optim.py")
TEST_SECONDS, DOCTOR_SECONDS = 240, 120


def card_of(device_name: str, arch: int) -> str:
    """The modelled card a device name is (the longest name found in it), else its arch's table card."""
    for name in sorted(gpu_model.CARDS, key=len, reverse=True):
        if name.replace("RTX ", "").lower() in device_name.lower():
            return name
    return gpu_model.card(min((80, 86, 89, 90), key=lambda a: abs(a - arch))).name


def planned_rows() -> list[dict]:
    rows = []
    for (name, (n, k)), m, direction in __import__("itertools").product(SHAPES.items(), MS, ("forward", "backward")):
        for path in PATHS + ("bf16", "bitsandbytes"):
            if path == "gemv" and (m > 64 or direction == "backward"):
                continue
            rows.append(dict(shape=name, N=n, K=k, M=m, direction=direction, path=path))
    return rows


def predictions(card: str) -> dict:
    """(M, N, K, direction) -> {path: modelled us, "bf16": us, "auto": the dispatched path's us}."""
    from qlora.kernels.nf4.ops import choose_path

    spec = gpu_model.card(card)
    rows = [r for r in _modelled_rows() if r["card"] == spec.name]
    out = {}
    for r in rows:
        direction = "forward" if r["transpose_weight"] else "backward"
        cols = r["N"] if r["transpose_weight"] else r["K"]
        chosen = choose_path(r["M"], torch.bfloat16, spec.arch, r["transpose_weight"], cols, (r["N"], r["K"]), 64)
        out[(r["M"], r["N"], r["K"], direction)] = {**r["estimates"], "bf16": r["bf16_estimate_us"],
                                                    "auto": r["estimates"][chosen]}
    return out


@functools.lru_cache(maxsize=1)
def _modelled_rows() -> list:
    return json.loads((ROOT / "benchmarks" / "results" / "kernels-static.json").read_text())["cards"]


def run_step(command: list[str], seconds: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds)
        status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        tail = (done.stdout + done.stderr)[-4000:]
    except subprocess.TimeoutExpired as stopped:
        status, tail = f"stopped after {seconds} s", ((stopped.stdout or b"")[-4000:]).decode(errors="replace")
    return {"command": " ".join(command), "status": status, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": tail}


def measure(repeats: int) -> list[dict]:
    """Every planned row timed on this GPU, in microseconds."""
    from kernels_gpu import POOL, Timer, import_bitsandbytes, quantized_weight

    from qlora.kernels import set_backend
    from qlora.kernels.nf4 import ops
    from qlora.kernels.nf4.matmul import fused_workspace_shape

    bnb, _ = import_bitsandbytes()
    timer = Timer(repeats)
    set_backend("triton")
    rows = []
    for name, (n, k) in SHAPES.items():
        w, packed, state = quantized_weight(n, k)
        weight = state.packed_view(packed)
        bnb_weight = None
        if bnb is not None:
            bnb_weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, blocksize=64, quant_type="nf4",
                                           compress_statistics=True).cuda()
        for m in MS:
            for direction in ("forward", "backward"):
                forward = direction == "forward"
                width = k if forward else n
                xs = [torch.randn(m, width, device="cuda", dtype=torch.bfloat16) for _ in range(POOL)]
                dense = w if forward else w.t()
                for path in PATHS + ("bf16", "bitsandbytes"):
                    if path == "gemv" and (m > 64 or not forward):
                        continue
                    if path == "bf16":
                        fn = lambda i: torch.nn.functional.linear(xs[i], dense)  # noqa: E731
                    elif path == "bitsandbytes":
                        if bnb_weight is None:
                            continue
                        state_t = bnb_weight.quant_state
                        fn = ((lambda i: bnb.matmul_4bit(xs[i], bnb_weight.t(), quant_state=state_t)) if forward
                              else (lambda i: xs[i] @ bnb.functional.dequantize_4bit(bnb_weight, state_t)))
                    else:
                        fn = lambda i, path=path: ops.matmul(xs[i], weight, None, forward, path)  # noqa: E731
                    with torch.no_grad():
                        ms = timer(fn)
                    rows.append(dict(shape=name, N=n, K=k, M=m, direction=direction, path=path,
                                     measured_us=round(1e3 * ms, 2)))
                    if path == "fused":  # which code ran: split-K (the last split sums) or one split
                        rows[-1]["split_k"] = fused_workspace_shape(m, (n, k), 64, forward, torch.bfloat16,
                                                                    xs[0].device)[0]
        print(f"timed {name}", file=sys.stderr, flush=True)
    set_backend(None)
    return rows


def planned_split_rows(arch: int, sms: int) -> list[dict]:
    """Every split the fused kernel can run at SPLIT_MS for SHAPES on sm_<arch> with `sms` SMs, each
    row marked `rule` where it is the launcher's own split (one a case)."""
    from types import SimpleNamespace

    from qlora.kernels.nf4.matmul import fused_plan

    device = SimpleNamespace(sms=sms)
    rows = []
    for (name, (n, k)), m, direction in itertools.product(SHAPES.items(), SPLIT_MS, ("forward", "backward")):
        forward = direction == "forward"

        def split_of(split_k=None):
            return fused_plan(m, torch.bfloat16, (n, k), 64, forward, True, arch, device, split_k)[3]

        rule = split_of()
        for split_k in sorted({split_of(split) for split in range(1, MAX_SPLIT + 1)}):
            rows.append(dict(shape=name, N=n, K=k, M=m, direction=direction, split_k=split_k, rule=split_k == rule))
    return rows


def measure_splits(rows: list[dict], repeats: int) -> None:
    """measured_us of each planned split row, timed as measure() times its rows."""
    from kernels_gpu import POOL, Timer, quantized_weight

    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    timer = Timer(repeats)
    for name, (n, k) in SHAPES.items():
        _, packed, state = quantized_weight(n, k)
        weight = state.packed_view(packed)
        for row in (r for r in rows if r["shape"] == name):
            forward = row["direction"] == "forward"
            xs = [torch.randn(row["M"], k if forward else n, device="cuda", dtype=torch.bfloat16) for _ in range(POOL)]
            with torch.no_grad():
                ms = timer(lambda i: matmul_4bit_fused(xs[i], weight, forward, split_k=row["split_k"]))
            row["measured_us"] = round(1e3 * ms, 2)
    print("timed the splits", file=sys.stderr, flush=True)


def attach_split_predictions(rows: list[dict], card: str) -> None:
    """model_us of each split row: the fused path's estimate at that split (compiles this card's code)."""
    import kernels_static

    spec = gpu_model.card(card)
    for row in rows:
        estimates = kernels_static.path_estimates(spec, row["M"], row["N"], row["K"], 64, row["direction"] == "forward",
                                                  lambda launch: None, row["split_k"])
        row["model_us"] = round(estimates["fused"], 3)


def split_summary(rows: list[dict]) -> dict:
    """Per case (shape, M, direction): the rule's split and time against the fastest measured split
    (`regret`: rule / fastest) and the model's fastest; the median and worst regret."""
    cases = []
    for key in sorted({(r["shape"], r["M"], r["direction"]) for r in rows}):
        case = [r for r in rows if (r["shape"], r["M"], r["direction"]) == key]
        rule = next(r for r in case if r["rule"])
        fastest = min(case, key=lambda r: r["measured_us"])
        entry = dict(shape=key[0], M=key[1], direction=key[2], rule_split=rule["split_k"], rule_us=rule["measured_us"],
                     fastest_split=fastest["split_k"], fastest_us=fastest["measured_us"],
                     regret=round(rule["measured_us"] / fastest["measured_us"], 3))
        if all(r.get("model_us") for r in case):
            entry["model_fastest_split"] = min(case, key=lambda r: r["model_us"])["split_k"]
        cases.append(entry)
    regrets = [c["regret"] for c in cases]
    return {"cases": cases, "regret_median": statistics.median(regrets), "regret_worst": max(regrets), "rows": rows}


def attach_predictions(rows: list[dict], predicted: dict) -> None:
    for row in rows:
        model = predicted.get((row["M"], row["N"], row["K"], row["direction"]), {}).get(row["path"])
        row["model_us"] = model
        if model is not None and row.get("measured_us"):
            row["model_error"] = round(abs(model - row["measured_us"]) / row["measured_us"], 3)


def refit(rows: list[dict], card: str) -> dict:
    """Coordinate descent over calibration.GRID on the measured rows of our paths and bf16: the model
    evaluated with each candidate's parameters (this card's kernels compiled through the same path)."""
    import calibration
    import kernels_static

    spec = gpu_model.card(card)
    timed = [r for r in rows if r["path"] in ("gemv", "fused", "dequant_matmul", "bf16") and r.get("measured_us")]

    def error(parameters: dict) -> float:
        gpu_model.PARAMETERS.update(parameters)
        errors = []
        for r in timed:
            forward = r["direction"] == "forward"
            if r["path"] == "bf16":
                rr, cols = (r["K"], r["N"]) if forward else (r["N"], r["K"])
                model = kernels_static.cublas_us(spec, r["M"], cols, rr)
            else:
                model = kernels_static.path_estimates(spec, r["M"], r["N"], r["K"], 64, forward, lambda row: None)[r["path"]]
            errors.append(abs(math.log(model / r["measured_us"])))
        return statistics.fmean(errors)

    start = dict(gpu_model.PARAMETERS)
    best = {key: start[key] for key in calibration.GRID}
    best_error = error(best)
    for _ in range(2):
        for key, values in calibration.GRID.items():
            for value in values:
                candidate = {**best, key: value}
                e = error(candidate)
                if e < best_error:
                    best, best_error = candidate, e
    gpu_model.PARAMETERS.update(start)
    return {"parameters": best, "mean_abs_log_error": round(best_error, 4), "rows": len(timed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dry-run", action="store_true", help="list the rows and the model's predictions; time nothing")
    parser.add_argument("--card", default=None, help="with --dry-run: the card to predict for (default H100)")
    parser.add_argument("--no-refit", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("gpu_check.py needs a CUDA GPU; none is visible here, so nothing was measured "
                  "(--dry-run lists what it would time).")
            return 0
        card = args.card or "H100"
        rows = planned_rows()
        attach_predictions(rows, predictions(card))
        missing = [r for r in rows if r["model_us"] is None and r["path"] != "bitsandbytes"]
        spec = gpu_model.card(card)
        splits = planned_split_rows(spec.arch, spec.sms)
        print(json.dumps({"card": card, "rows": len(rows), "without_prediction": len(missing),
                          "split_rows": len(splits)}))
        return 1 if missing else 0
    start = time.perf_counter()
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    card = card_of(name, 10 * major + minor)
    steps = {"gpu_tests": run_step([sys.executable, "-m", "pytest", "-q", "-m", "not slow", *GPU_TEST_FILES], TEST_SECONDS),
             "doctor": run_step([sys.executable, "-m", "qlora.cli", "doctor"], DOCTOR_SECONDS)}
    for step, outcome in steps.items():
        print(f"{step}: {outcome['status']} in {outcome['seconds']} s", flush=True)
    torch.manual_seed(0)
    rows = measure(args.repeats)
    attach_predictions(rows, predictions(card))
    errors = [r["model_error"] for r in rows if "model_error" in r]
    result = {"device": name, "card_modelled": card, "versions": versions("triton", "gemlite"), "steps": steps,
              "rows": rows, "model_median_abs_error": round(statistics.median(errors), 3) if errors else None,
              "model_worst_abs_error": round(max(errors), 3) if errors else None}
    splits = planned_split_rows(10 * major + minor, torch.cuda.get_device_properties(0).multi_processor_count)
    measure_splits(splits, args.repeats)
    if not args.no_refit:
        result["refit"] = refit(rows, card)
        attach_split_predictions(splits, card)
    result["splits"] = split_summary(splits)
    print(f"split rule against the fastest split measured: median {result['splits']['regret_median']}x, "
          f"worst {result['splits']['regret_worst']}x")
    result["seconds"] = round(time.perf_counter() - start, 1)
    path = write_results("gpu-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", card), result,
                         path=Path(args.out) if args.out else None)
    print(f"model error on this card: median {result['model_median_abs_error']}, worst {result['model_worst_abs_error']}")
    print(f"wrote {path} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
