"""Footprint and peak host memory of loading mixture-of-experts models in NF4 + DQ: a slice of
Qwen3-30B-A3B and of gpt-oss-20b at their real dimensions (random bf16 weights, the first
`--layers` decoder layers, the full vocabulary), with qlora and with transformers + bitsandbytes,
each in a fresh process, in the same run. Writes benchmarks/results/moe_load.json.

    python benchmarks/moe_load.py [--models qwen3-30b-a3b gpt-oss-20b] [--layers 2] [--workdir DIR]

The checkpoints are written in the Hub's layout: Qwen3-MoE as one tensor per expert and projection
(`experts.{i}.gate_proj.weight`, what the Hub and `save_pretrained` hold), gpt-oss as fused 3-D
tensors (`experts.gate_up_proj [E, H, 2I]`, its bf16 release's layout). The whole model's bytes
are projected from the slice: (slice - non-layer tensors) / layers x all layers + non-layer tensors.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import device_name, peak_rss, print_table, versions, write_results, write_shards  # noqa: E402

# Real dimensions, from each model's config.json on the Hub.
MODELS = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", all_layers=48, config=dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=151936, tie_word_embeddings=False, norm_topk_prob=True)),
    "gpt-oss-20b": dict(model_type="gpt_oss", all_layers=24, config=dict(
        hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
        tie_word_embeddings=False)),
}
GIB = 2**30


def hub_tensors(model_type: str, name: str, shape: torch.Size):
    """(checkpoint key, shape) pairs that a model parameter is stored as on the Hub: Qwen3-MoE's fused
    expert stacks are one tensor per expert and projection there; everything else is as named."""
    fused = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", name)
    if model_type != "qwen3_moe" or not fused:
        yield name, tuple(shape)
        return
    prefix, which = fused.groups()
    experts, rows, cols = shape
    for e in range(experts):
        if which == "down_proj":
            yield f"{prefix}.{e}.down_proj.weight", (rows, cols)
        else:  # gate_up [E, 2I, H]: gate rows first, then up
            yield f"{prefix}.{e}.gate_proj.weight", (rows // 2, cols)
            yield f"{prefix}.{e}.up_proj.weight", (rows // 2, cols)


def write_random_checkpoint(directory: Path, model: str, layers: int, shard_bytes: int = 1 << 30) -> dict:
    """A random bf16 checkpoint in the Hub's layout, written tensor by tensor (one shard in memory at a time)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = MODELS[model]
    config = AutoConfig.for_model(spec["model_type"], num_hidden_layers=layers, **spec["config"])
    if spec["model_type"] == "gpt_oss":
        config.layer_types = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    counts = {"parameters": 0, "outside_layers": 0}

    def tensors():
        for name, param in skeleton.named_parameters():
            counts["parameters"] += param.numel()
            if ".layers." not in name:
                counts["outside_layers"] += param.numel()
            for key, shape in hub_tensors(spec["model_type"], name, param.shape):
                yield {key: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)}

    write_shards(directory, tensors(), shard_bytes)
    (directory / "counts.json").write_text(json.dumps(counts))
    return counts


def _child(loader: str, directory: str) -> None:
    """Runs in a fresh process: load to the CPU, then print a JSON line of measurements."""
    import qlora
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    # The model code transformers imports lazily is not loading memory: import it for both loaders.
    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    baseline = peak_rss()
    start = time.perf_counter()
    if loader == "qlora":
        model = qlora.load_model(directory, device="cpu", progress=False)
    else:
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, dtype=torch.bfloat16,
                                                     device_map="cpu")
    seconds = time.perf_counter() - start
    peak = peak_rss()
    footprint = qlora.memory_footprint(model)
    layers = sum(qlora.memory_footprint(layer) for layer in model.model.layers)
    # The largest matrix left in 16 bits inside the decoder layers (0 when every one is quantized).
    dense = [p.numel() for n, p in model.model.layers.named_parameters() if p.is_floating_point() and p.dim() >= 2]
    print(json.dumps({"loader": loader, "seconds": seconds, "peak_rss": peak, "baseline_rss": baseline,
                      "footprint": footprint, "layers_footprint": layers,
                      "largest_16bit_in_layers": max(dense, default=0)}))


def measure(loader: str, directory: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", loader, str(directory)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{loader} load of {directory} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def project(row: dict, counts: dict, layers: int, all_layers: int) -> float:
    """The whole model's bytes from the slice: the layers' share scaled to every layer."""
    outside = row["footprint"] - row["layers_footprint"]
    return outside + row["layers_footprint"] / layers * all_layers


def mxfp4_requantization_error(size: int = 2880) -> dict:
    """Relative error that re-quantizing gpt-oss's MXFP4 expert values to NF4 + DQ would add (the reason
    qlora holds them as MXFP4), on a Gaussian matrix of gpt-oss-20b's expert size."""
    from qlora.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
    from qlora.quant.nf4.weight import Weight4bit

    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.02
    values = dequantize_mxfp4(*quantize_mxfp4(weight), (size, size), torch.float32)
    requantized = Weight4bit.quantize(values).dequantize(torch.float32)
    error = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"mxfp4_vs_weight": error(values, weight), "nf4_of_mxfp4_vs_mxfp4": error(requantized, values),
            "nf4_vs_weight": error(Weight4bit.quantize(weight).dequantize(torch.float32), weight)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the slice")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-moe-load"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)

    loaders = ["qlora"]
    try:
        import bitsandbytes  # noqa: F401

        loaders.append("transformers+bitsandbytes")
    except ImportError:
        print("bitsandbytes is not installed: measuring qlora alone")
    results, table = [], []
    for model in args.models:
        checkpoint = args.workdir / f"{model}-{args.layers}l"
        if not (checkpoint / "counts.json").is_file():
            print(f"writing a random {model} slice to {checkpoint} ...", flush=True)
            write_random_checkpoint(checkpoint, model, args.layers)
        counts = json.loads((checkpoint / "counts.json").read_text())
        bf16 = counts["parameters"] * 2
        all_layers = MODELS[model]["all_layers"]
        bf16_whole = (counts["outside_layers"] + (counts["parameters"] - counts["outside_layers"]) / args.layers
                      * all_layers) * 2
        for loader in loaders:
            row = measure(loader, checkpoint)
            row.update(model=model, bf16_bytes=bf16, whole_model_bytes=project(row, counts, args.layers, all_layers),
                       whole_model_bf16_bytes=bf16_whole)
            results.append(row)
            table.append({
                "model": model, "loader": loader,
                "slice GiB": f"{row['footprint'] / GIB:.2f}",
                "of bf16": f"{row['footprint'] / bf16:.3f}",
                "largest 16-bit matrix": f"{row['largest_16bit_in_layers']:,}",
                "peak RSS GiB": f"{row['peak_rss'] / GIB:.2f}",
                "over baseline GiB": f"{(row['peak_rss'] - row['baseline_rss']) / GIB:.2f}",
                "load s": f"{row['seconds']:.1f}",
                "whole model GB": f"{row['whole_model_bytes'] / 1e9:.1f}",
            })
    print(f"slices of {args.layers} decoder layers, random bf16 weights, loaded to the CPU in NF4 + DQ")
    print_table(table, list(table[0]))
    requantization = mxfp4_requantization_error()
    print("gpt-oss publishes its experts in MXFP4; re-quantizing those values to NF4 + DQ would add a relative "
          f"error of {requantization['nf4_of_mxfp4_vs_mxfp4']:.3f} (qlora holds them as MXFP4 instead)")
    path = write_results("moe_load", {"device": device_name(), "versions": versions(), "layers": args.layers,
                                       "models": {m: MODELS[m] for m in args.models}, "rows": results,
                                       "mxfp4_requantization": requantization})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
