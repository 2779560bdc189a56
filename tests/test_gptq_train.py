"""quantization=gptq4 with any recipe: the dense tiny model is GPTQ-quantized on first use into the
cache, LoRA trains on it, a second run reuses the cache, and `qlora export` merges into
dequant(GPTQ W) read from the cached checkpoint."""
from pathlib import Path

from hydra import compose, initialize_config_dir

from qlora.train.schema import register
from tiny_run import WORDS, overrides, save_tiny_model_with_tokenizer, write_copy_task

ROOT = Path(__file__).resolve().parents[1]
register()


def test_lora_on_a_gptq_base_quantized_on_first_use_then_exported(tmp_path):
    from qlora.export import export_merged, read_merge_record
    from qlora.train import run

    model_dir = save_tiny_model_with_tokenizer(tmp_path / "model")
    task = write_copy_task(tmp_path / "task.jsonl")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n\n".join(" ".join(WORDS[i:i + 40]) for i in range(0, 120, 8)))
    gptq = {"quantization": "gptq4", "quantization.compute_dtype": "float32",
            "quantization.gptq.dataset": str(calibration), "quantization.gptq.samples": 4,
            "quantization.gptq.model_seqlen": 16, "quantization.gptq.group_size": 32,
            "quantization.gptq.cache_dir": str(tmp_path / "cache"), "trainer.max_steps": 2, "trainer.save_every": 0,
            "trainer.eval_every": 0}

    def compose_run(run_dir):
        with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
            return compose(config_name="config", overrides=[o for o in overrides(model_dir, task, run_dir, **gptq)
                                                            if not o.startswith("hydra.")])

    summary = run(compose_run(tmp_path / "run"), run_dir=tmp_path / "run")
    assert summary["steps"] == 2
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "quantize_config.json").is_file()
    stamp = (cached[0] / "model.safetensors").stat().st_mtime_ns
    run(compose_run(tmp_path / "again"), run_dir=tmp_path / "again")
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not re-quantized

    export_merged(tmp_path / "run", tmp_path / "merged", base="dequantized", dtype="float32", progress=False)
    record = read_merge_record(tmp_path / "merged")
    assert record["base_model"] == str(cached[0]) and record["quantization"]["format"] == "gptq"
