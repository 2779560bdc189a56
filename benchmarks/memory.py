"""Memory features of qlora against transformers + PEFT + bitsandbytes, QLoRA-training a
Llama-3-8B-shaped model with random weights (LoRA r=16 on all linear layers, batch 1, gradient
checkpointing): peak device memory at seq 2048 and 8192, the longest sequence that trains under a
24 GiB cap and under the whole card, and tokens/s at seq 2048. Every configuration runs in a fresh
process (clean peaks); each search probe is a full forward + backward + optimizer step.

    python benchmarks/memory.py                          # GPU: all configurations, ~8 minutes
    python benchmarks/memory.py --configs all_on --search card --max-seconds 540 --merge   # context goal
    python benchmarks/memory.py --device cpu             # small Llama, peak RSS per process

The searches share what --max-seconds leaves after the fixed measurements: a probe predicted to
overrun its share is not run, and the result is then a bound, marked as such. --merge replaces
this run's configurations in an existing results file and keeps the others. Writes
benchmarks/results/memory-<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, ForkedProcess, device_name, peak_rss, print_table, release_host_memory,  # noqa: E402
                    reset_peak_rss, versions, write_results)
from memory_analysis import (GIB, GOAL_CONTEXT, describe_peak, format_search, goals, predict_longest,  # noqa: E402
                             predict_seconds, search_longest, table, timed_seq)

SIZES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "small": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=2048),
}
DEFAULT_SEQS = {"llama3-8b": (2048, 8192), "small": (512, 2048), "tiny": (128, 256)}
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
LR = 2e-4
H100_GIB = 79.2  # what an 80 GB H100 reports as its total memory: the card the goals are set for
EVENT = "@memory-bench "  # prefix of the JSON lines a child reports on stdout


@dataclasses.dataclass(frozen=True)
class Config:
    description: str
    stack: str = "qlora"  # "qlora" or "peer" (transformers + PEFT + bitsandbytes)
    optimizer: str = "adamw"  # adamw | paged_adamw | paged_adamw_8bit | adamw_8bit | bnb_paged_adamw_32bit
    chunked_loss: bool = False
    offload: bool = False


CONFIGS = {
    "hf_bnb": Config("transformers + PEFT + bitsandbytes NF4+DQ, prepare_model_for_kbit_training, "
                     "bf16 autocast, paged_adamw_32bit", stack="peer", optimizer="bnb_paged_adamw_32bit"),
    "baseline": Config("qlora, torch AdamW, plain loss, plain checkpointing"),
    "paged_adamw": Config("qlora + PagedAdamW (32-bit states in host memory)", optimizer="paged_adamw"),
    "paged_adamw_8bit": Config("qlora + PagedAdamW8bit", optimizer="paged_adamw_8bit"),
    "chunked_loss": Config("qlora + chunked loss (no [tokens, vocab] logits)", chunked_loss=True),
    "activation_offload": Config("qlora + checkpointed layer inputs offloaded to host", offload=True),
    # The reference of the throughput goal: all_on with the paging and the offload taken out.
    "all_on_unpaged": Config("all_on without paging or offload (AdamW8bit states on the device)",
                             optimizer="adamw_8bit", chunked_loss=True),
    # Last, so that the time the others' searches leave goes to its long-context search.
    "all_on": Config("qlora + PagedAdamW8bit + chunked loss + activation offload",
                     optimizer="paged_adamw_8bit", chunked_loss=True, offload=True),
}


# ---- the child: one configuration in a fresh process -----------------------------------------

def emit(event: str, **fields) -> None:
    print(EVENT + json.dumps({"event": event, **fields}), flush=True)


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text))


def skeleton(shape: dict):
    """The model on the meta device: no memory until each tensor is filled."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def random_weight(shape, device) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02


def fill_dense_parameters(model, device) -> None:
    """Random bf16 embeddings and head, unit norms, for whatever is still on the meta device."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                value = (torch.ones(param.shape, dtype=torch.bfloat16, device=device) if param.dim() == 1
                         else random_weight(param.shape, device))
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    model.to(device)  # the buffers built outside the meta device (rotary frequencies)


def build_qlora(shape: dict, device):
    import qlora
    from qlora.lora import attach_lora
    from qlora.models.loading import replace_linear_layers

    model = skeleton(shape)
    replace_linear_layers(model, qlora.QuantConfig())
    for module in model.modules():  # one layer at a time: the dense weight exists only while quantized
        if isinstance(module, qlora.Linear4bit):
            module.set_weight(random_weight((module.out_features, module.in_features), device))
    fill_dense_parameters(model, device)
    return attach_lora(model, **LORA, gradient_checkpointing=True)


def build_peer(shape: dict, device):
    """What transformers' from_pretrained(quantization_config=BitsAndBytesConfig(...)) builds, from
    random weights quantized by bitsandbytes layer by layer, then the usual QLoRA preparation."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = skeleton(shape)
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            meta = module.weight  # carries the quantization settings, as in transformers' loader
            module.weight = bnb.nn.Params4bit(random_weight(meta.shape, device), requires_grad=False,
                                              **meta.__dict__).to(device)
    fill_dense_parameters(model, device)
    model.is_loaded_in_4bit = True  # what the bitsandbytes quantizer sets after loading
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))


def optimizer_candidates(name: str):
    """(label, factory) in order of preference; later ones are substitutes when a piece cannot run here."""
    torch_adamw = ("torch.optim.AdamW", lambda p: torch.optim.AdamW(p, lr=LR))
    if name == "adamw":
        return [torch_adamw]
    if name == "bnb_paged_adamw_32bit":
        import bitsandbytes as bnb

        return [("bitsandbytes PagedAdamW32bit", lambda p: bnb.optim.PagedAdamW32bit(p, lr=LR)),
                ("bitsandbytes AdamW32bit (not paged)", lambda p: bnb.optim.AdamW32bit(p, lr=LR)), torch_adamw]
    from qlora.optim import PagedAdamW, PagedAdamW8bit

    return {"paged_adamw": [("qlora PagedAdamW", lambda p: PagedAdamW(p, lr=LR))],
            "paged_adamw_8bit": [("qlora PagedAdamW8bit", lambda p: PagedAdamW8bit(p, lr=LR))],
            "adamw_8bit": [("qlora PagedAdamW8bit(paged=False)",
                            lambda p: PagedAdamW8bit(p, lr=LR, paged=False))]}[name]


def make_optimizer(name: str, params, device):
    """The first candidate that completes a step on a probe parameter here; failures are recorded."""
    failures = []
    for label, factory in optimizer_candidates(name):
        try:
            probe = torch.nn.Parameter(torch.randn(8192, device=device))
            probe.grad = torch.randn_like(probe)
            factory([probe]).step()
            return factory(params), label, failures
        except Exception as err:  # noqa: BLE001 (any failure means: substitute, and say why)
            failures.append(f"{label} failed here ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})")
    raise RuntimeError(f"no optimizer for {name} runs here: {failures}")


class Trainer:
    """One configuration's model, optimizer and training step, and the measurements on them."""

    def __init__(self, config: Config, shape: dict, device: torch.device):
        self.config, self.shape, self.device = config, shape, device
        self.model = (build_peer if config.stack == "peer" else build_qlora)(shape, device)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer, self.optimizer_label, self.substitutions = make_optimizer(config.optimizer, params, device)
        self.offloader = None
        if config.offload:
            from qlora.train.offload import ActivationOffloader

            self.offloader = ActivationOffloader(self.model)
        self.sync()
        release_host_memory()
        self.rss_after_build = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, length: int) -> None:
        ids = torch.randint(0, self.shape["vocab_size"], (1, length), device=self.device)  # fresh tokens each step
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
        # bf16 autocast, as the trainers of both stacks run (HF Trainer bf16=True, accelerate bf16).
        with torch.autocast(self.device.type, dtype=torch.bfloat16), (self.offloader or nullcontext()):
            if self.config.stack == "peer":
                loss = self.model(**batch).loss  # transformers' own loss, as its Trainer computes it
            else:
                from qlora.train.loss import token_loss_sum

                loss_sum, count = token_loss_sum(self.model, batch, chunked=self.config.chunked_loss)
                loss = loss_sum / max(count, 1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def measure(self, length: int, count: int) -> dict:
        """`count` steps at `length`: their times, the memory peaks over them, and the message of
        the out-of-memory error that stopped them, if one did."""
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            release_host_memory()
        reset_peak_rss()
        times, error = [], None
        for _ in range(count):
            try:
                start = time.perf_counter()
                self.step(length)
                self.sync()
                times.append(time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001
                if not is_out_of_memory(err):
                    raise
                error = str(err).splitlines()[0][:300]
            if error:  # outside the except block, so the failed step's tensors are released
                self.optimizer.zero_grad(set_to_none=True)
                release_host_memory()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                break
        record = dict(seq=length, step_seconds=times, oom=error, peak_rss=peak_rss())
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()  # includes managed memory (bitsandbytes' paged states)
            record.update(peak_allocated=torch.cuda.max_memory_allocated(),
                          peak_reserved=torch.cuda.max_memory_reserved(), device_used_after=total - free)
        # What a cap applies to: the allocator's peak on a GPU; on CPU the peak RSS over the built model.
        record["footprint"] = record.get("peak_allocated", record["peak_rss"] - self.rss_after_build)
        return record

    def set_cap(self, cap_bytes: float | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # cached blocks above a new cap would otherwise still be reused
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_bytes or total) / total))


def child_main(spec: dict) -> None:
    started, device = time.time(), torch.device(spec["device"])
    on_cuda = device.type == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    build_start = time.perf_counter()
    trainer = Trainer(CONFIGS[spec["config"]], SIZES[spec["size"]], device)
    emit("built", seconds=time.perf_counter() - build_start, optimizer=trainer.optimizer_label,
         substitutions=trainer.substitutions, trainable_parameters=trainer.trainable,
         rss_after_build=trainer.rss_after_build, device=torch.cuda.get_device_name(device) if on_cuda else None,
         device_total_bytes=torch.cuda.get_device_properties(device).total_memory if on_cuda else None,
         allocated_after_build=torch.cuda.memory_allocated() if on_cuda else None)

    memory_points, time_points = [], []
    for length in spec["seqs"]:
        # tokens/s is reported at one length: the others get one warm-up and one step (a peak and a time).
        warmup, steps = (spec["warmup"], spec["steps"]) if length == spec["timed_seq"] else (1, 1)
        record = trainer.measure(length, warmup + steps)
        if not record["oom"]:
            median = statistics.median(record["step_seconds"][warmup:])
            record["tokens_per_s"] = length / median
            time_points.append((length, median))
            memory_points.append((length, record["footprint"]))
        emit("seq", **record)
    emit("fixed_done")

    deadline = min(time.time() + spec["search_seconds"], spec["hard_deadline"])
    for cap_name, cap_bytes in spec["caps"]:
        cap_bytes = cap_bytes or card_bytes(device)
        emit("search_start", cap=cap_name, cap_bytes=cap_bytes)
        result = run_search(trainer, cap_name, cap_bytes, memory_points, time_points, deadline, spec)
        emit("search", cap=cap_name, cap_bytes=cap_bytes, **result)
    emit("done", seconds=time.time() - started)


def card_bytes(device) -> float:
    """The whole card, or an 80 GB H100's worth of a larger one (the card the goals are set for)."""
    return min(torch.cuda.get_device_properties(device).total_memory, H100_GIB * GIB)


def run_search(trainer: Trainer, cap_name: str, cap_bytes: float, memory_points, time_points, deadline, spec) -> dict:
    on_cuda = trainer.device.type == "cuda"

    def fits(length: int) -> bool:
        emit("probe_start", cap=cap_name, seq=length)
        start = time.perf_counter()
        record = trainer.measure(length, 1)
        # On a GPU the cap is enforced (out of memory or not); host memory has no per-process cap,
        # so on CPU the step fits when its RSS growth over the built model stays under the cap.
        ok = not record["oom"] and (on_cuda or record["footprint"] <= cap_bytes)
        if not record["oom"]:
            time_points.append((length, record["step_seconds"][0]))
            memory_points.append((length, record["footprint"]))
        emit("probe", cap=cap_name, fits=ok, seconds=time.perf_counter() - start, **record)
        return ok

    def can_probe(length: int) -> bool:  # margin for the prediction, the batch and an out-of-memory cleanup
        return time.time() + predict_seconds(time_points, length) * 1.2 + (3.0 if on_cuda else 1.0) < deadline

    # Just under the predicted limit, so that the second probe (5% above) closes the search.
    guess = 0.98 * (predict_longest(memory_points, cap_bytes) or 2 * max(spec["seqs"]))
    if spec.get("goal_probe") and cap_name == "card":
        guess = spec["goal_probe"]  # one probe decides the goal; the search goes on from there
    trainer.set_cap(cap_bytes if on_cuda else None)
    try:
        return search_longest(fits, int(guess), granularity=spec["granularity"], ceiling=spec["max_search_seq"],
                              can_probe=can_probe)
    finally:
        trainer.set_cap(None)


# ---- the parent: run the children, print, write ------------------------------------------------

def preload() -> None:
    """Import what the children use, before forking them."""
    for name in ("peft", "transformers.integrations", "transformers.models.llama.modeling_llama", "qlora.lora",
                 "qlora.optim", "qlora.train.loss", "qlora.train.offload", "bitsandbytes"):
        if importlib.util.find_spec(name.split(".")[0]):
            importlib.import_module(name)


class ChildRunner:
    """Runs the configurations in fresh processes, each with a share of the time budget."""

    def __init__(self, args, names: list[str], caps: list):
        self.args, self.names, self.caps = args, names, caps
        self.run_end = time.time() + args.max_seconds
        self.fixed_seconds: list[float] = []
        self.lock = threading.Lock()
        self.launched = 0

    def log(self, name: str, text: str) -> None:
        with self.lock:
            print(f"[{name}] {text}", flush=True)

    def run_all(self) -> list[dict]:
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            return list(pool.map(self.run_one, self.names))

    def run_one(self, name: str) -> dict:
        args, row = self.args, {"config": name, "description": CONFIGS[name].description, "seqs": [], "searches": {}}
        with self.lock:
            remaining, left = self.run_end - time.time(), len(self.names) - self.launched
            self.launched += 1
            fixed = statistics.mean(self.fixed_seconds) if self.fixed_seconds else args.fixed_estimate
        if remaining < 0.5 * fixed:
            row["error"] = f"not run: {remaining:.0f} s of the time budget left, a configuration takes ~{fixed:.0f} s"
            self.log(name, row["error"])
            return row
        share = max(0.0, remaining * args.jobs / left - fixed)
        spec = dict(config=name, device=args.device, size=args.size, seqs=args.seqs, timed_seq=timed_seq(args.seqs),
                    steps=args.steps, warmup=args.warmup, caps=self.caps, search_seconds=share,
                    hard_deadline=self.run_end - 5,
                    granularity=args.granularity, max_search_seq=args.max_search_seq,
                    goal_probe=args.goal_probe if name == "all_on" else None,
                    threads=max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
        self.log(name, f"starting ({CONFIGS[name].description}); search share {share:.0f} s")
        started, probing = time.time(), None
        with tempfile.TemporaryFile("w+") as stderr:
            if args.fork:
                proc = ForkedProcess(child_main, spec, stderr=stderr)
            else:
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                        stdout=subprocess.PIPE, stderr=stderr, text=True)
            # The budget is enforced here too: a step that runs far past its prediction is cut off.
            killer = threading.Timer(max(1.0, self.run_end + args.grace - time.time()), proc.kill)
            killer.start()
            for line in proc.stdout:
                if line.startswith(EVENT):
                    probing = self.record(name, row, json.loads(line[len(EVENT):]), started, probing)
            proc.wait()
            killer.cancel()
            row["wall_seconds"] = time.time() - started
            if proc.returncode != 0:
                stderr.seek(0)
                tail = stderr.read()[-3000:]
                reason = ("killed at the end of the time budget" if proc.returncode < 0 and time.time() >= self.run_end
                          else f"exit status {proc.returncode}")
                salvage_searches(row, probing, reason)
                row["error"] = f"{reason}; stderr tail:\n{tail}"
                self.log(name, f"{reason}\n{tail[-1500:]}")
        return row

    def record(self, name: str, row: dict, event: dict, started: float, probing):
        """Fold one event into the row and print progress; returns the probe under way, if any."""
        kind = event.pop("event")
        if kind == "built":
            row["build"] = event
            subs = f"; SUBSTITUTED: {event['substitutions']}" if event["substitutions"] else ""
            self.log(name, f"built in {event['seconds']:.1f} s, optimizer {event['optimizer']}{subs}")
        elif kind == "seq":
            row["seqs"].append(event)
            speed = f"{event['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in event else f"OOM {event['oom']}"
            self.log(name, f"seq {event['seq']}: {describe_peak(event)}, {speed}")
        elif kind == "fixed_done":
            with self.lock:
                self.fixed_seconds.append(time.time() - started)
        elif kind == "probe_start":
            return event
        elif kind == "probe":
            row["searches"].setdefault(event["cap"], {}).setdefault("probe_details", []).append(event)
            verdict = "fits" if event["fits"] else "does not fit"
            self.log(name, f"probe under {event['cap']} at seq {event['seq']}: {verdict} "
                           f"({event['seconds']:.1f} s, {describe_peak(event)})")
        elif kind == "search":
            search = row["searches"].setdefault(event["cap"], {})
            search.update(event)
            self.log(name, f"longest under {event['cap']}: {format_search(search)}")
        return None if kind in ("probe", "search") else probing


def salvage_searches(row: dict, probing: dict | None, reason: str) -> None:
    """Bounds from the probes a process finished before it ended (killed at the end of the budget, or
    by the system for host memory: `unfinished_probe` is then the length it died on)."""
    if probing:
        row["searches"].setdefault(probing["cap"], {})["unfinished_probe"] = probing["seq"]
    for search in row["searches"].values():
        if "longest" not in search:
            details = search.setdefault("probe_details", [])
            search.update(longest=max((p["seq"] for p in details if p["fits"]), default=0),
                          shortest_failing=min((p["seq"] for p in details if not p["fits"]), default=None),
                          complete=False, stopped=f"process ended: {reason}",
                          probes=[[p["seq"], p["fits"]] for p in details])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--size", choices=tuple(SIZES), help="model shape (default: llama3-8b on cuda, small on cpu)")
    add("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    add("--seqs", nargs="+", type=int, help="lengths measured (tokens/s at 2048, or at the first)")
    add("--steps", type=int, help="timed steps at 2048 (or the first length), after the warm-up (default 5; cpu 2)")
    add("--warmup", type=int, help="untimed steps before those (default 2; cpu 1); other lengths: one of each")
    add("--search", choices=("both", "cap", "card", "none"), default="both",
        help="longest-sequence searches: under --cap-gib, under the whole card, both or none")
    add("--no-search", dest="search", action="store_const", const="none")
    add("--cap-gib", type=float, help="the capped search's cap (default 24; cpu: 0.5 GiB of RSS over the built model)")
    add("--card-gib", type=float, help=f"the whole card (default: the device, at most {H100_GIB} GiB: an 80 GB H100)")
    add("--max-search-seq", type=int, help="no probe longer than this (default: none on cuda, 8192 on cpu)")
    add("--max-seconds", type=float, default=480.0, help="time budget of the whole run (default 480)")
    add("--jobs", type=int, default=1, help="configurations run at once (cpu only; their timings share the cores)")
    add("--spawn", action="store_true", help="cpu: a fresh interpreter per configuration, not a fork of this one")
    add("--out", type=Path, help="results file (default: benchmarks/results/memory-<device>.json)")
    add("--merge", action="store_true", help="keep the configurations of --out that this run does not measure")
    add("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return parser, args
    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    if on_cuda and args.jobs != 1:
        parser.error("--jobs > 1 would share the GPU between configurations; use it on cpu only")
    args.size = args.size or ("llama3-8b" if on_cuda else "small")
    args.seqs = args.seqs or list(DEFAULT_SEQS[args.size])
    args.steps = args.steps or (5 if on_cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if on_cuda else 1)
    args.granularity, args.grace = (256 if on_cuda else 64), 20.0
    args.max_search_seq = args.max_search_seq or (None if on_cuda else 8192)
    # Seconds a configuration takes before its searches, until the first one has been measured.
    args.fixed_estimate = 35.0 if on_cuda else 30.0
    args.goal_probe = (math.ceil((GOAL_CONTEXT + 1) / 256) * 256 if on_cuda and args.size == "llama3-8b" else None)
    args.fork = not on_cuda and not args.spawn  # never fork a CUDA process (this one leaves CUDA alone)
    args.caps = []  # (name, bytes); None: the whole card, which the child finds out
    if on_cuda and args.search in ("both", "cap"):
        args.caps.append((f"{args.cap_gib or 24:g}GiB", (args.cap_gib or 24) * GIB))
    if on_cuda and args.search in ("both", "card"):
        args.caps.append(("card", args.card_gib * GIB if args.card_gib else None))
    if not on_cuda and args.search != "none":  # no card on a CPU: the capped search only, on RSS growth
        args.caps.append((f"{args.cap_gib or 0.5:g}GiB-rss", (args.cap_gib or 0.5) * GIB))
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    on_cuda, started = args.device == "cuda", time.time()
    names, rows = list(dict.fromkeys(args.configs)), []
    missing = [m for m in ("bitsandbytes", "peft") if importlib.util.find_spec(m) is None]  # not imported: seconds
    if "hf_bnb" in names and missing:
        names.remove("hf_bnb")
        rows.append(dict(config="hf_bnb", description=CONFIGS["hf_bnb"].description, seqs=[], searches={},
                         skipped=f"not installed: {', '.join(missing)}"))
        print(f"[hf_bnb] skipped: {rows[-1]['skipped']}", flush=True)
    print(f"{args.size} on {args.device}: configurations {names}, seqs {args.seqs}, searches "
          f"{[c[0] for c in args.caps] or 'none'}, budget {args.max_seconds:.0f} s", flush=True)
    if args.fork:
        preload()
    rows += ChildRunner(args, names, args.caps).run_all()
    for row in rows:
        row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")

    # The device as the children saw it: the parent never initializes CUDA (its context would take
    # device memory from them).
    built = [r["build"] for r in rows if r.get("build", {}).get("device")]
    if on_cuda:
        device = built[0]["device"] if built else "cuda (no configuration ran)"
        card = min(built[0]["device_total_bytes"], H100_GIB * GIB) if built else None
        caps = [(name, cap or card) for name, cap in args.caps]
    else:
        device, caps = f"{device_name()} ({os.cpu_count()} cores)", args.caps
    out = args.out or RESULTS / f"memory-{re.sub(r'[^A-Za-z0-9_.-]+', '_', device.split(' (')[0])}.json"
    if args.merge and out.is_file():
        previous = json.loads(out.read_text())
        if previous.get("device") != device or previous.get("size") != args.size:
            parser.error(f"--merge: {out} holds {previous.get('size')} on {previous.get('device')}, not this run's")
        rows += [r for r in previous["rows"] if r["config"] not in {row["config"] for row in rows}]
        rows.sort(key=lambda r: list(CONFIGS).index(r["config"]))
        caps = list({**previous["settings"]["caps"], **dict(caps)}.items())  # the kept rows' searches too

    verdicts = goals(rows, args)
    print(f"\n{args.size} QLoRA (r={LORA['r']}, all linear layers, batch 1, gradient checkpointing) on {device}; "
          + ("peaks: torch allocator, max allocated" if on_cuda else "peaks: process VmHWM"))
    lines = table(rows, args.seqs, caps, on_cuda)
    print_table(lines, list(lines[0]))
    print()
    for goal in verdicts:
        scope = f" [{goal['scope']}]" if goal["scope"] else ""
        print(f"{goal['verdict'].upper():>13}  {goal['goal']}: {goal['gap']}{scope}")
    payload = dict(
        benchmark="memory", device=device, device_type=args.device, versions=versions("peft", "accelerate"),
        qlora_backend=os.environ.get("QLORA_BACKEND", "auto (default)"), size=args.size, shape=SIZES[args.size],
        lora=LORA, lr=LR, batch_size=1, configs={n: dataclasses.asdict(c) for n, c in CONFIGS.items()},
        settings=dict(seqs=args.seqs, steps=args.steps, warmup=args.warmup, search=args.search, caps=dict(caps),
                      max_seconds=args.max_seconds, granularity=args.granularity, max_search_seq=args.max_search_seq,
                      jobs=args.jobs, fork=args.fork, omp_num_threads=os.environ.get("OMP_NUM_THREADS")),
        notes=NOTES["cuda" if on_cuda else "cpu"], goals=verdicts, rows=rows, wall_seconds=time.time() - started)
    path = write_results(out.stem, payload, path=out)
    print(f"wrote {path} ({time.time() - started:.0f} s)", flush=True)


NOTES = {
    "cuda": "peak_allocated: the torch allocator's max allocated bytes over the steps at a length. bitsandbytes' paged "
            "states live in CUDA managed memory, outside those counts and the cap (device_used_after, from "
            "cudaMemGetInfo after the last step, includes them). A probe is one full training step under "
            "set_per_process_memory_fraction(cap / total). The peer runs prepare_model_for_kbit_training (embeddings, "
            "norms, lm_head upcast to fp32) and non-reentrant checkpointing, like qlora.",
    "cpu": "A reduced size, to exercise the script: peaks are each child's VmHWM (reset per length), imported "
           "libraries included; children are forked from a parent that imported them (--spawn: fresh interpreters). "
           "qlora's paging and offload have no second memory on CPU (bookkeeping only). The capped search fits a step "
           "when its RSS growth over the built model stays under the cap.",
}

if __name__ == "__main__":
    main()
