"""The package as users get it: Python started in the repository root works, and a wheel built from
the repository trains the embedded default with `qlora train` from an empty folder."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
# Two optimizer steps, no evaluation, no before/after scoring: seconds, not minutes.
SHORT_RUN = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0", "trainer.exact_match_examples=0",
             "trainer.micro_batch_size=4"]


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run(args, cwd, timeout=300, env=ENV):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


# ---- Python started in the repository root --------------------------------------------------------
def test_python_in_the_repository_root_loads_a_model():
    # The root is first on sys.path there, and transformers imports Hugging Face's `kernels` package
    # while loading a model when it is installed: our kernels/ folder must not stand in its way.
    code = ("import os, sys, qlora, torch\n"
            "model = qlora.load_model('qlora/embedded/base', device='cpu', progress=False)\n"
            "print(model(torch.tensor([[1, 2, 3]])).logits.shape)\n"
            "import kernels\n"
            "print(os.path.realpath(kernels.__file__))\n")
    if not hf_kernels_installed():
        code = code.replace("import kernels\n", "import importlib.util; assert importlib.util.find_spec('qlora.kernels')\n")
        code = code.replace("print(os.path.realpath(kernels.__file__))\n", "")
    out = run([sys.executable, "-c", code], cwd=ROOT).stdout.splitlines()
    assert out[0] == "torch.Size([1, 3, 4096])"
    if hf_kernels_installed():
        assert not out[1].startswith(str(ROOT)), "the root's kernels/ folder was imported as `kernels`"


def test_the_root_kernels_folder_hands_over_or_is_absent(tmp_path):
    # The hand-over alone, in a copy of the folder: with site-packages on the path `import kernels`
    # is whatever is installed there (Hugging Face's package, or nothing); without site-packages
    # (python -S) it fails as a missing module would, never importing our kernels.
    fake_root = tmp_path / "repo"
    (fake_root / "kernels").mkdir(parents=True)
    shutil.copy(ROOT / "kernels" / "__init__.py", fake_root / "kernels" / "__init__.py")
    absent = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=fake_root, capture_output=True,
                            text=True, timeout=60)
    assert absent.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in absent.stderr, absent.stderr
    code = ("import os\ntry:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent')\n"
            "else:\n    print(os.path.realpath(kernels.__file__))\n")
    found = run([sys.executable, "-c", code], cwd=fake_root, timeout=60).stdout.strip()
    if hf_kernels_installed():
        site = os.path.realpath(sysconfig.get_paths()["purelib"])
        assert found.startswith(site) or not found.startswith(str(fake_root)), found
    else:
        assert found == "absent"


@pytest.mark.slow
def test_python_m_pytest_runs_from_the_root():
    result = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_quant_format.py"],
                 cwd=ROOT, timeout=600)
    assert " passed" in result.stdout and " failed" not in result.stdout


# ---- the wheel ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh virtual environment with the wheel built from this repository installed (the other
    requirements come from the running environment: nothing is downloaded)."""
    import setuptools

    # The build runs without isolation (no download): it needs the build requirement pyproject.toml names.
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"building the wheel offline needs setuptools >= 70.1 (bdist_wheel built in); "
                    f"this environment has {setuptools.__version__}")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for name in files:  # a copy, so the build leaves nothing (build/, *.egg-info) in the repository
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"),
         str(source)], cwd=work, timeout=600)
    wheel = next((work / "dist").glob("qlora-*.whl"))
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], cwd=work, timeout=300)
    empty = work / "empty"
    empty.mkdir()
    return venv, empty


@pytest.mark.slow
def test_the_wheel_is_complete_and_imports_from_itself(wheel_env):
    venv, empty = wheel_env
    code = ("import qlora, qlora.distributed, qlora.kernels.nf4.ops as ops, qlora.recipes\n"
            "print(qlora.__file__); print(qlora.recipes.__file__); print(len(ops.path_table(90)) > 0)\n")
    out = run([str(venv / "bin" / "python"), "-c", code], cwd=empty).stdout.splitlines()
    assert all(line.startswith(str(venv)) for line in out[:2]), out
    assert out[2] == "True"  # the dispatch table (data) is in the wheel
    composed = run([str(venv / "bin" / "qlora"), "train", "distributed=fsdp2", "recipe=llama3_8b_nf4", "--cfg", "job"],
                   cwd=empty).stdout
    assert "strategy: fsdp2" in composed and "Meta-Llama-3-8B" in composed
    # A user's own recipe folder composes with the shipped recipes (Hydra's search path).
    mine = empty.parent / "my_recipes" / "recipe"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /quantization: fp4\n"
                                    "trainer:\n  run_name: mine\n  max_steps: 7\n")
    composed = run([str(venv / "bin" / "qlora"), "train", f"hydra.searchpath=[file://{mine.parent}]", "recipe=mine",
                    "--cfg", "job"], cwd=empty).stdout
    assert "run_name: mine" in composed and "max_steps: 7" in composed and "quant_type: fp4" in composed


@pytest.mark.slow
def test_the_wheel_trains_the_embedded_default_from_an_empty_folder(wheel_env):
    venv, empty = wheel_env
    run([str(venv / "bin" / "qlora"), "train", *SHORT_RUN], cwd=empty, timeout=600)
    adapters = list(empty.glob("outputs/embedded/*/adapter/adapter_model.safetensors"))
    assert len(adapters) == 1, sorted(p.relative_to(empty) for p in empty.rglob("*"))[:40]
