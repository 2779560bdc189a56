"""`qlora eval`: the run's own held-out loss, exact match, other data, merged models, and bad input."""
import importlib.util
import json
import math

import pytest

from qlora.cli import main
from quality_runs import train_tiny
from tiny_run import save_tiny_model_with_tokenizer, write_copy_task


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_assets")
    assets = save_tiny_model_with_tokenizer(base / "model"), write_copy_task(base / "task.jsonl")
    run_dir = base / "run"
    summary = train_tiny(assets, run_dir)
    return assets, run_dir, summary


def test_run_dir_gives_the_training_eval_loss(trained, capsys):
    _, run_dir, summary = trained
    assert main(["eval", f"run_dir={run_dir}", "max_new_tokens=4", "progress=false"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    metrics = result["metrics"]
    # The same model, the same held-out split, the same token-mean loss as the trainer's final evaluation:
    # only the batching differs (fp32 sums in another order), ~1e-7 relative.
    assert math.isclose(metrics["loss"], summary["final_eval_loss"], rel_tol=1e-5)
    assert math.isclose(metrics["ppl"], math.exp(metrics["loss"]), rel_tol=1e-9)
    assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["examples"] == 7  # 10% of 64 records, rounded up
    assert "held-out" in result["data"] and "4-bit base" in result["model"]
    assert "wrote" in capsys.readouterr().out


def test_other_data_and_a_merged_model(trained, tmp_path):
    from qlora.export import export_merged

    (model_dir, _), run_dir, _ = trained
    data = write_copy_task(tmp_path / "other.jsonl", count=12, seed=5)
    out = tmp_path / "adapter_eval.json"
    assert main(["eval", f"run_dir={run_dir}", f"data={data}", "metrics=loss,ppl", f"out={out}",
                 "progress=false"]) == 0
    adapter_loss = json.loads(out.read_text())["metrics"]
    assert adapter_loss["examples"] == 12 and "exact_match" not in adapter_loss

    merged = export_merged(run_dir, tmp_path / "merged", dtype="float32", progress=False)
    assert main(["eval", f"model={merged}", f"data={data}", "format=prompt_completion", "metrics=loss",
                 "progress=false"]) == 0
    merged_loss = json.loads((merged / "eval.json").read_text())["metrics"]
    # The merged fp32 model computes the 4-bit model + adapter's function up to fp32 rounding.
    assert math.isclose(merged_loss["loss"], adapter_loss["loss"], rel_tol=1e-5)
    assert "ppl" not in merged_loss


def test_data_without_the_needed_fields(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1 w2", "answer": "w2 w1"}) + "\n")
    assert main(["eval", f"run_dir={run_dir}", f"data={bad}", "progress=false"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: a warning from datasets, if any)
    assert err.startswith("error:") and "record 0" in err and "'completion'" in err


@pytest.mark.parametrize("args,message", [
    (["metrics=loss,bleu"], "unknown ['bleu']"),
    (["format=no.such.Format", "data=DATA"], "format='no.such.Format'"),
])
def test_bad_options(trained, tmp_path, capsys, args, message):
    (_, data), run_dir, _ = trained
    args = [a.replace("DATA", str(data)) for a in args]
    assert main(["eval", f"run_dir={run_dir}", f"out={tmp_path / 'e.json'}", "progress=false", *args]) == 1
    assert message in capsys.readouterr().err


def test_model_and_run_dir_together_is_a_usage_error(trained, capsys):
    _, run_dir, _ = trained
    assert main(["eval", f"run_dir={run_dir}", f"model={run_dir}"]) == 2
    assert "exactly one of run_dir" in capsys.readouterr().err


def test_lm_eval_tasks(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    code = main(["eval", f"run_dir={run_dir}", "tasks=no_such_task_xyz", f"out={tmp_path / 'e.json'}",
                 "progress=false"])
    err = capsys.readouterr().err
    assert code == 1
    if importlib.util.find_spec("lm_eval") is None:
        assert "lm-evaluation-harness, which is not installed" in err and 'pip install "qlora[eval]"' in err
    else:
        assert "unknown lm-eval task(s): 'no_such_task_xyz'" in err
