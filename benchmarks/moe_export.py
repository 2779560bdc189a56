"""Peak host memory and time of `qlora export` (format=hf) on a 2-layer slice of Qwen3-30B-A3B at its real
dimensions (128 experts of 2048x768, vocabulary 151936: 3.7 GB in bf16), with LoRA on attention and on
every expert stack, measured in a fresh process. Writes benchmarks/results/moe_export.json.

    python benchmarks/moe_export.py [--layers 2] [--max-shard-size 1GB] [--workdir /tmp/qlora-moe-export]
    python benchmarks/moe_export.py --layers 8 --experts 16 --vocab 32000 --max-shard-size 256MB --name moe_export_8l

The second form has more layers than the peak could hide (a 2-layer slice's one layer is a third of it).

What the figure should show: the merge holds one layer's projection stack (16-bit, 0.8 GB for gate_up) and
its merged copy, plus at most one output shard; never the whole model.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import device_name, peak_rss, print_table, versions, write_results, write_shards  # noqa: E402

# Qwen3-30B-A3B's config.json (48 layers there).
SHAPE = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
             num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False, norm_topk_prob=True)
RANK = 8


def write_checkpoint(directory: Path, layers: int, shape: dict) -> int:
    """A random bf16 checkpoint in the Hub's per-expert layout, one parameter's tensors per shard; returns its bytes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    from transformers.core_model_loading import revert_weight_conversion

    config = Qwen3MoeConfig(num_hidden_layers=layers, **shape)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    # Per-expert tensors, as the Hub holds them (transformers' own reverse conversion of each stack).
    pieces = (revert_weight_conversion(skeleton, {name: (torch.randn(param.shape, generator=generator) * 0.02)
                                                  .to(torch.bfloat16)}) for name, param in skeleton.named_parameters())
    return write_shards(directory, pieces, shard_bytes=0)


def write_adapter(run_dir: Path, checkpoint: Path) -> None:
    """A run dir with a random adapter in PEFT's own layout (keys and shapes from PEFT's injection into a meta
    model): r=8 on every attention projection and on every expert stack."""
    import yaml
    from accelerate import init_empty_weights
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                        base_model_name_or_path=str(checkpoint))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    injected = inject_adapter_in_model(config, skeleton, low_cpu_mem_usage=True)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, param in injected.named_parameters():
        if "lora_" in name:
            key = "base_model.model." + name.replace(".default", "")
            tensors[key] = (torch.randn(param.shape, generator=generator) * 0.01).to(torch.bfloat16)
    (run_dir / "adapter").mkdir(parents=True, exist_ok=True)
    config.save_pretrained(run_dir / "adapter")
    save_file(tensors, run_dir / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    quant = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "blocksize": 64,
             "quant_storage": "uint8", "skip_modules": ["lm_head"]}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(checkpoint), "dtype": "bfloat16", "revision": None, "trust_remote_code": False},
        "quantization": quant}))


def _child(run_dir: str, output_dir: str, max_shard_size: str) -> None:
    """Runs in a fresh process: export, then print a JSON line of measurements."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.export import export_merged

    config = AutoConfig.from_pretrained(json.loads((Path(run_dir) / "adapter" / "adapter_config.json").read_text())
                                        ["base_model_name_or_path"])
    with init_empty_weights():  # model code imported lazily by transformers: not counted as export memory
        AutoModelForCausalLM.from_config(config)
    baseline = peak_rss()
    start = time.perf_counter()
    export_merged(run_dir, output_dir, max_shard_size=max_shard_size, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    stack = config.num_experts * 2 * config.moe_intermediate_size * config.hidden_size * 2
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss(), "baseline_rss": baseline,
                      "gate_up_stack_bf16": stack}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-moe-export"))
    parser.add_argument("--experts", type=int, default=SHAPE["num_experts"])
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"])
    parser.add_argument("--name", default="moe_export", help="results file name")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)

    shape = {**SHAPE, "num_experts": args.experts, "vocab_size": args.vocab}
    checkpoint = args.workdir / f"qwen3moe-{args.layers}l-{args.experts}e-{args.vocab}v"
    run_dir, output = args.workdir / "run", args.workdir / "merged"
    if not (checkpoint / "model.safetensors.index.json").is_file():
        print(f"writing a random checkpoint to {checkpoint} ...", flush=True)
        write_checkpoint(checkpoint, args.layers, shape)
    total = json.loads((checkpoint / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    shutil.rmtree(run_dir, ignore_errors=True)
    write_adapter(run_dir, checkpoint)
    result = subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(output), args.max_shard_size],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"export failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    written = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    shutil.rmtree(output, ignore_errors=True)
    gib = 2**30
    table = [{
        "export s": f"{row['seconds']:.1f}",
        "peak RSS GiB": f"{row['peak_rss'] / gib:.2f}",
        "RSS over baseline GiB": f"{(row['peak_rss'] - row['baseline_rss']) / gib:.2f}",
        "bf16 model GiB": f"{total / gib:.2f}",
        "one gate_up stack GiB": f"{row['gate_up_stack_bf16'] / gib:.2f}",
        "max shard": args.max_shard_size,
    }]
    print(f"qlora export format=hf of a {args.layers}-layer Qwen3-30B-A3B slice ({args.experts} experts of 2048x768, "
          f"vocabulary {args.vocab}; LoRA r={RANK} on attention and experts), {written / gib:.2f} GiB written")
    print_table(table, list(table[0]))
    path = write_results(args.name, {"device": device_name(), "versions": versions(), "layers": args.layers,
                                      "shape": shape, "bf16_bytes": total, "max_shard_size": args.max_shard_size,
                                         "written_bytes": written, **row})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
