"""The `qlora` console script: export and generate in subprocesses, on a tiny trained run."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir

from qlora.train.schema import register
from test_train import ROOT
from tiny_run import overrides, save_tiny_model_with_tokenizer, write_copy_task

register()
QLORA = shutil.which("qlora")
pytestmark = pytest.mark.skipif(QLORA is None, reason="the qlora console script is not installed (pip install -e .)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (seconds-long) training run of qlora.train.runner on the tiny model."""
    from qlora.train import run

    base = tmp_path_factory.mktemp("cli")
    assets = save_tiny_model_with_tokenizer(base / "model"), write_copy_task(base / "task.jsonl")
    run_dir = base / "run"
    extra = {"trainer.max_steps": 2, "trainer.save_every": 2, "trainer.eval_every": 2, "lora.init_lora_weights": "false"}
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[o for o in overrides(*assets, run_dir, **extra)
                                                       if not o.startswith("hydra.")])
    run(cfg, run_dir=run_dir)
    return run_dir


def qlora_cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([QLORA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_documents_every_option(capsys):
    # In process: each subprocess costs seconds of imports, and --help needs no isolation.
    from qlora.cli import EXPORT_OPTIONS, GENERATE_OPTIONS, main

    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "export" in top and "generate" in top
    assert main(["export", "--help"]) == 0
    export_help = capsys.readouterr().out
    assert all(f"  {key} " in export_help for key in EXPORT_OPTIONS)
    assert main(["generate", "--help"]) == 0
    generate_help = capsys.readouterr().out
    assert all(f"  {key} " in generate_help for key in GENERATE_OPTIONS)


def test_export_then_generate(run_dir, tmp_path):
    result = qlora_cli("export", f"run_dir={run_dir}", "output_dir=merged", "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "merged"
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "config.json").read_text())["qlora_merge"]["base"] == "dequantized"

    for model in ("merged", str(run_dir)):  # the merged dir, and the run itself (4-bit base + adapter)
        result = qlora_cli("generate", f"model={model}", "prompt=w1 w2 w3", "max_new_tokens=6", "temperature=0",
                           cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        text, _, stats = result.stdout.strip().rpartition("\n")
        assert text.strip(), result.stdout
        assert "tokens/s" in stats, result.stdout


def test_export_rejects_unknown_key(run_dir, tmp_path):
    result = qlora_cli("export", f"run_dir={run_dir}", "output_dir=x", "fromat=nf4", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown key 'fromat'" in result.stderr and "format" in result.stderr
    assert not (tmp_path / "x").exists()


def test_export_usage_errors(run_dir, tmp_path, capsys, monkeypatch):
    from qlora.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("")
    assert main(["export", f"run_dir={run_dir}", "output_dir=full"]) == 1
    err = capsys.readouterr().err
    assert "output_dir=full is not empty; pass overwrite=true to replace it" in err and "True" not in err
    assert main(["export", f"run_dir={run_dir}", "out=full"]) == 1  # the former key name still works
    err = capsys.readouterr().err
    assert "out= is deprecated; use output_dir=" in err and "output_dir=full is not empty" in err
    assert main(["export", "output_dir=y"]) == 2 and "missing run_dir=" in capsys.readouterr().err
    assert main(["export", "run_dir", "output_dir=y"]) == 2 and "not key=value" in capsys.readouterr().err
    assert main(["generate", "model=m", "prompt=p", "temperature=hot"]) == 2
    assert "temperature='hot' must be a number" in capsys.readouterr().err
    assert main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err
    # A device that does not exist here is refused before any model is read, by every command that takes one.
    for command in (["generate", "model=m", "prompt=p"], ["eval", "run_dir=r"], ["quantize", "model=m", "dataset=d",
                                                                                  "output_dir=o"]):
        assert main([*command, "device=banana"]) == 2
        assert capsys.readouterr().err.strip() == "error: device='banana' is not a device; use cpu, cuda, cuda:<index> or auto"
        if not torch.cuda.is_available():
            assert main([*command, "device=cuda"]) == 2
            assert "device=cuda but this machine has no CUDA device" in capsys.readouterr().err


def test_every_example_qlora_help_prints_uses_current_keys(capsys):
    # `qlora --help` showed `quantize ... output_dir=gptq4/`, which quantize then refused.
    import shlex

    from qlora.cli import COMMANDS, RENAMED_KEYS, USAGE, parse_options
    from qlora.train import compose_recipe

    examples = [shlex.split(line) for line in USAGE.splitlines() if line.startswith("  qlora ")]
    assert {words[1] for words in examples} == {"train", *COMMANDS} - {"doctor"}
    for words in examples:
        name, args = words[1], words[2:]
        if name == "train":
            compose_recipe(args)  # the overrides compose and validate
            continue
        parse_options(name, args, COMMANDS[name][0], RENAMED_KEYS.get(name))
        assert "deprecated" not in capsys.readouterr().err, words  # no former key names in the examples
