"""train.py on a tiny Qwen3-MoE: experts in 4 bits, LoRA on them, every memory option, the router's aux loss."""
import json

import pytest
from peft import LoraConfig

from test_train import ROOT, compose_run, losses, read_metrics  # noqa: F401 (ROOT registers the schema)
from tiny_moe import save_tiny_moe_with_tokenizer
from tiny_run import write_copy_task


@pytest.fixture(scope="module")
def moe_assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_assets")
    model = save_tiny_moe_with_tokenizer(base / "model", output_router_logits=True, router_aux_loss_coef=0.01)
    return model, write_copy_task(base / "task.jsonl")


@pytest.mark.slow
def test_tiny_moe_trains_with_memory_options_and_aux_loss(moe_assets, tmp_path):
    from qlora.train import run

    run_dir = tmp_path / "run"
    cfg = compose_run(moe_assets, run_dir, **{"trainer.max_steps": 4, "trainer.save_every": 0, "trainer.eval_every": 0,
                                              "trainer.gradient_checkpointing": "true",
                                              "trainer.activation_offload": "true", "lora.dropout": 0.0,
                                              "optimizer": "paged_adamw"})
    summary = run(cfg, run_dir=run_dir)
    assert summary["steps"] == 4
    metrics = [m for m in read_metrics(run_dir) if "loss" in m]
    assert all(m["router_aux_loss"] > 0 for m in metrics)  # logged as its own metric
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    config = LoraConfig.from_pretrained(run_dir / "adapter")
    assert sorted(config.target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    assert not log or "expert stacks" in log
    summary_file = json.loads((run_dir / "summary.json").read_text())
    assert summary_file["steps"] == 4

    # qlora eval and qlora generate on the run: the 4-bit MoE base with its expert adapter.
    from qlora.cli import main

    assert main(["eval", f"run_dir={run_dir}", "max_new_tokens=4", "progress=false"]) == 0
    metrics = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert metrics["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-4)
    assert main(["generate", f"model={run_dir}", "prompt=w1 w2", "max_new_tokens=3", "chat=false"]) == 0
