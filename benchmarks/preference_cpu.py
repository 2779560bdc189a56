"""DPO against SFT on the same model and data, and against TRL's DPOTrainer with PEFT, on this CPU.

    python benchmarks/preference_cpu.py [steps=10] [micro_batch=16] [pairs=320]

Model: the embedded 6.9 M-parameter Llama (qlora/embedded/base). Data: the first `pairs` embedded
preference pairs (qlora/embedded/preference_train.jsonl). Each configuration runs in a fresh process
(so its peak resident set, VmHWM, is its own) with 2 threads:
- qlora SFT: objective=sft on the pairs' chosen answers (NF4 + double quant base, LoRA r=16 on all
  linear layers, as the embedded recipe), `steps` optimizer steps of `micro_batch` examples;
- qlora DPO: objective=dpo, the same, `micro_batch` pairs per step (2 x micro_batch sequences) plus
  the reference forward with the adapter disabled;
- TRL DPO: trl.DPOTrainer with the same LoRA through peft_config, beta 0.1, the same batch, on the same
  model loaded dense in fp32 (TRL takes a 4-bit base only through bitsandbytes).
tokens/s = attention-mask tokens of the policy's sequences (chosen + rejected for DPO) / training
time (TRL: its num_tokens over train_runtime); both include the first step. Prints a table and writes
benchmarks/results/preference_cpu.json (CPU name, versions, shapes, ratios).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _ROOT]  # kernels/ shadowing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_rss, print_table, versions, write_results  # noqa: E402

THREADS = 2


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def pairs_file(directory: Path, count: int) -> Path:
    from qlora.embedded.preferences import PREFERENCE_TRAIN

    path = directory / "pairs.jsonl"
    lines = PREFERENCE_TRAIN.read_text().splitlines()[:count]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_qlora(objective: str, data: Path, steps: int, micro_batch: int, out: Path) -> dict:
    from qlora.train import run
    from qlora.train.recipes import compose_recipe

    cfg = compose_recipe([f"objective={objective}", "data=embedded_preferences", f"data.source={data}",
                          "data.eval_source=null", "data.eval_fraction=0.05", f"trainer.max_steps={steps}",
                          f"trainer.micro_batch_size={micro_batch}", "trainer.eval_every=0", "trainer.save_every=0",
                          "trainer.eval_batches=1", "trainer.eval_samples=0", "trainer.exact_match_examples=0",
                          "lora.dropout=0.0"])
    summary = run(cfg, run_dir=out)
    return {"tokens": summary["tokens"], "seconds": summary["train_seconds"]}


def run_trl(data: Path, steps: int, micro_batch: int, out: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from qlora.embedded import BASE_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR, dtype=torch.float32)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    train = datasets.Dataset.from_list(records[:int(len(records) * 0.95)])  # the share qlora trains on
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=micro_batch, max_steps=steps, learning_rate=1e-3,
                     beta=0.1, max_length=128, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    return {"tokens": int(tokens), "seconds": result.metrics["train_runtime"]}


def child(name: str, data: Path, steps: int, micro_batch: int, result: Path) -> None:
    import torch

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as out:
        if name == "trl_dpo":
            row = run_trl(data, steps, micro_batch, Path(out))
        else:
            row = run_qlora(name.split("_")[1], data, steps, micro_batch, Path(out) / "run")
    row["peak_rss_gb"] = peak_rss() / 1e9
    result.write_text(json.dumps(row))


def measure(name: str, data: Path, steps: int, micro_batch: int, directory: Path) -> dict | None:
    result = directory / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, __file__, "--child", name, str(data), str(steps), str(micro_batch),
                           str(result)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{name} failed:\n{(done.stdout + done.stderr)[-2000:]}")
        return None
    row = json.loads(result.read_text())
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    return {"config": name, **row}


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    steps, micro_batch, count = int(args.get("steps", 10)), int(args.get("micro_batch", 16)), int(args.get("pairs", 320))
    try:
        import trl  # noqa: F401
        names = ["qlora_sft", "qlora_dpo", "trl_dpo"]
    except ImportError:
        print("trl is not installed: TRL's DPOTrainer is left out (pip install trl)")
        names = ["qlora_sft", "qlora_dpo"]
    with tempfile.TemporaryDirectory() as tmp:
        data = pairs_file(Path(tmp), count)
        rows = [r for r in (measure(n, data, steps, micro_batch, Path(tmp)) for n in names) if r is not None]
    by = {r["config"]: r for r in rows}
    ratios = {}
    if "qlora_sft" in by and "qlora_dpo" in by:
        ratios["dpo_over_sft_tokens_per_s"] = by["qlora_dpo"]["tokens_per_s"] / by["qlora_sft"]["tokens_per_s"]
        ratios["dpo_over_sft_peak_rss"] = by["qlora_dpo"]["peak_rss_gb"] / by["qlora_sft"]["peak_rss_gb"]
    if "trl_dpo" in by and "qlora_dpo" in by:
        ratios["qlora_over_trl_dpo_tokens_per_s"] = by["qlora_dpo"]["tokens_per_s"] / by["trl_dpo"]["tokens_per_s"]
        ratios["qlora_over_trl_dpo_peak_rss"] = by["qlora_dpo"]["peak_rss_gb"] / by["trl_dpo"]["peak_rss_gb"]
    print(f"{cpu_name()}, {THREADS} threads; embedded 6.9M Llama, LoRA r=16 all-linear, {steps} steps x "
          f"{micro_batch} examples (pairs for DPO), max_seq_len 128")
    print_table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["config", "tokens", "seconds", "tokens_per_s", "peak_rss_gb"])
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    path = write_results("preference_cpu", {
        "cpu": cpu_name(), "threads": THREADS, "versions": versions("trl", "peft", "accelerate"),
        "shapes": {"model": "embedded Llama, 6.9M parameters, hidden 256", "lora": "r=16 alpha=32 all-linear",
                   "steps": steps, "micro_batch": micro_batch, "pairs": count, "max_seq_len": 128,
                   "qlora_base": "NF4 + double quant, fp32 compute", "trl_base": "dense fp32"},
        "rows": rows, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        name, data, steps, micro_batch, result = sys.argv[2:7]
        child(name, Path(data), int(steps), int(micro_batch), Path(result))
    else:
        main(sys.argv[1:])
