"""Peak host memory and time of loading a random ~1B-parameter Llama (bf16 safetensors) in NF4,
with qlora and with transformers + bitsandbytes, each in a fresh process, in the same run.
Writes benchmarks/results/streaming_load.json.

    python benchmarks/streaming_load.py [--layers 16] [--workdir /tmp/qlora-stream]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import device_name, peak_rss, print_table, versions, write_results, write_shards  # noqa: E402

# TinyLlama-1.1B's shape: 1.10 B parameters, 2.2 GB in bf16.
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, tie_word_embeddings=False)


def write_random_checkpoint(directory: Path, layers: int, shard_bytes: int = 1 << 30) -> int:
    """A random bf16 Llama checkpoint written tensor by tensor (one shard in memory at a time); returns
    its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from accelerate import init_empty_weights

    config = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    tensors = ({name: (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)}
               for name, param in skeleton.named_parameters())
    return write_shards(directory, tensors, shard_bytes) // 2


def _child(loader: str, directory: str) -> None:
    """Runs in a fresh process: load, then print a JSON line of measurements."""
    import qlora  # noqa: F401  (imports counted in the baseline)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    # Build the meta skeleton once before the baseline, so that the model code transformers
    # imports lazily is not counted as loading memory (for either loader); the same for the lookup of
    # which Auto class builds the checkpoint (transformers' lazy model mappings import their configs).
    from qlora.models.families import auto_class

    config = AutoConfig.from_pretrained(directory)
    auto_class(config)
    with init_empty_weights():
        AutoModelForCausalLM.from_config(config)
    baseline = peak_rss()
    start = time.perf_counter()
    if loader == "qlora":
        import qlora

        model = qlora.load_model(directory, device="cpu", progress=False)
        footprint = qlora.memory_footprint(model)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, dtype=torch.bfloat16,
                                                     device_map="cpu")
        footprint = model.get_memory_footprint()
    seconds = time.perf_counter() - start
    peak = peak_rss()
    largest = max(p.numel() for p in model.parameters()) * 2  # the largest dense bf16 tensor read
    print(json.dumps({"loader": loader, "seconds": seconds, "peak_rss": peak, "baseline_rss": baseline,
                      "footprint": footprint, "largest_tensor": largest}))


def measure(loader: str, directory: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", loader, str(directory)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{loader} load failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: TinyLlama-1.1B)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-streaming-load"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)

    checkpoint = args.workdir / f"llama-{args.layers}l"
    if not (checkpoint / "model.safetensors.index.json").is_file():
        print(f"writing a random checkpoint to {checkpoint} ...", flush=True)
        params = write_random_checkpoint(checkpoint, args.layers)
    else:
        params = sum(math.prod(t) for t in _shapes(checkpoint))
    loaders = ["qlora"]
    try:
        import bitsandbytes  # noqa: F401

        loaders.append("transformers+bitsandbytes")
    except ImportError:
        print("bitsandbytes is not installed: measuring qlora alone")
    rows = [measure(loader, checkpoint) for loader in loaders]
    gib = 2**30
    table = [{
        "loader": r["loader"],
        "load s": f"{r['seconds']:.1f}",
        "peak RSS GiB": f"{r['peak_rss'] / gib:.2f}",
        "RSS over baseline GiB": f"{(r['peak_rss'] - r['baseline_rss']) / gib:.2f}",
        "quantized model GiB": f"{r['footprint'] / gib:.2f}",
        "largest tensor GiB": f"{r['largest_tensor'] / gib:.3f}",
    } for r in rows]
    print(f"{params / 1e9:.2f} B parameters, bf16 checkpoint {params * 2 / gib:.2f} GiB, loaded to CPU in NF4 + DQ")
    print_table(table, list(table[0]))
    path = write_results("streaming_load", {"device": device_name(), "versions": versions(),
                                             "parameters": params, "layers": args.layers, "rows": rows})
    print(f"wrote {path}")


def _shapes(directory: Path):
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    for file in set(index["weight_map"].values()):
        with safe_open(str(directory / file), "pt") as handle:
            for key in handle.keys():
                yield handle.get_slice(key).get_shape()


if __name__ == "__main__":
    main()
