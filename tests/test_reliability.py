"""Failures a user can cause or suffer: each ends in one clear line, and nothing is lost or executed.

Bad recipe values and keys, malformed data, missing and damaged models, offline Hub ids, damaged
and malicious checkpoints, a NaN run, kill -9 mid-write, Ctrl-C, and the CLI's inputs. Runs use the
tiny model of tiny_run.py (seconds); the NaN case uses the embedded default as a user would.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from qlora.errors import UserError
from qlora.train import checkpoint as ckpt
from qlora.train.schema import ConfigError, register
from test_train import ROOT, assets, compose_run, losses  # noqa: F401  (assets is a fixture)
from tiny_run import overrides

register()
TRAIN = str(ROOT / "train.py")




def train(assets, run_dir, **extra) -> dict:
    from qlora.train import run

    return run(compose_run(assets, run_dir, **extra), run_dir=run_dir)


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, in runs/first."""
    run_dir = tmp_path_factory.mktemp("trained") / "runs" / "first"
    train(assets, run_dir, **{"trainer.max_steps": 4, "trainer.save_every": 2, "trainer.eval_every": 0})
    return run_dir


def copy_run(trained, parent: Path) -> Path:
    target = parent / "runs" / "first"
    shutil.copytree(trained, target)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def last_line(text: str) -> str:
    """The last line as a terminal shows it: a progress bar redraws its line after a carriage return."""
    return text.strip().replace("\r", "\n").splitlines()[-1]


def train_py(args, cwd, env_extra=None, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("QLORA_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, TRAIN, *args], cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


# ---- recipes: everything checked before anything loads ----------------------------------------
@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=-0.001", r"optimizer\.lr=-0\.001 must be a finite number > 0; e\.g\. optimizer\.lr=2e-4"),
    ("optimizer.lr=abc", r"optimizer\.lr='abc' must be a finite number > 0"),
    ("optimizer.betas=[0.9,1.0]", r"optimizer\.betas=\[0\.9, 1\.0\] must be two numbers in \[0, 1\)"),
    ("optimizer.eps=0", r"optimizer\.eps=0 must be a finite number > 0"),
    ("optimizer.weight_decay=-1", r"optimizer\.weight_decay=-1 must be a finite number >= 0"),
    ("+trainer.max_step=10", r"unknown recipe key trainer\.max_step .*did you mean trainer\.max_steps\?"),
    ("+optimizer.lrr=1", r"unknown recipe key optimizer\.lrr: .*did you mean optimizer\.lr\?"),
    ("+data.format.templat=x", r"unknown recipe key data\.format\.templat: .*did you mean data\.format\.template\?"),
    ("scheduler.name=cosin", r"scheduler\.name='cosin' must be one of .*cosine"),
    ("scheduler.num_warmup_steps=-1", r"scheduler\.num_warmup_steps=-1 must be an integer >= 0"),
    ("trainer.nonfinite=ignore", r"trainer\.nonfinite='ignore' is not one of stop, skip"),
    ("optimizer._target_=torch.optim.Nope", r"optimizer\._target_='torch\.optim\.Nope' cannot be imported"),
])
def test_bad_recipe_values_and_keys_are_refused(override, message):
    from qlora.train import compose_recipe

    with pytest.raises(ConfigError, match=message):
        compose_recipe([override])


@pytest.mark.parametrize("overrides,message", [
    (["trainer.device=banana"], r"trainer\.device='banana' is not a device; set trainer\.device=cpu"),
    (["model.dtype=banana"], r"model\.dtype='banana' is not one of bfloat16, float16, float32, null"),
    (["trainer.device=cpu", "trainer.mixed_precision=fp16"], r"trainer\.mixed_precision=fp16 cannot run on a CPU"),
    *([(["trainer.device=cuda"], r"trainer\.device=cuda but this machine has no CUDA device")]
      if not torch.cuda.is_available() else []),
])
def test_settings_this_machine_cannot_honour_are_refused_before_loading(overrides, message, tmp_path):
    # trainer.device=banana and =cuda on a CPU trained on the CPU with exit 0; fp16 autocast on a CPU
    # trained in fp32: each is refused with one line, before the model loads, leaving no run folder.
    from qlora.train import compose_recipe, run

    with pytest.raises(ConfigError, match=message):
        run(compose_recipe(overrides), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_py_reports_one_line_and_tracebacks_only_on_request(tmp_path, capsys, monkeypatch):
    proc = train_py(["+trainer.max_step=10", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert last_line(err) == ("error: unknown recipe key trainer.max_step (a key added with + must exist too); "
                              "did you mean trainer.max_steps?")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before it started: no run folder left behind
    from qlora.errors import report

    for variable in ("QLORA_DEBUG", "HYDRA_FULL_ERROR"):  # what train.py and qlora print through
        monkeypatch.setenv(variable, "1")
        try:
            raise ConfigError("bad\nvalue")
        except ConfigError as error:
            report(error)
        err = capsys.readouterr().err
        assert "Traceback" in err and last_line(err) == "error: bad value"
        monkeypatch.delenv(variable)


def test_a_backend_that_cannot_run_here_is_one_line(assets, tmp_path):
    # QLORA_BACKEND=triton on a CPU without the interpreter: the first 4-bit product refuses; the user saw
    # a 171-line traceback whose last line was the message.
    args = overrides(*assets, tmp_path / "run", **{"trainer.max_steps": 1, "trainer.eval_every": 0})
    proc = train_py(args, tmp_path, {"QLORA_BACKEND": "triton", "TRITON_INTERPRET": "0"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert last_line(err).startswith("error: QLORA_BACKEND=triton cannot run on cpu tensors")
    import qlora

    four_bit = qlora.save_model(qlora.load_model(assets[0], device="cpu", progress=False), tmp_path / "nf4")
    for backend in ("triton", "banana"):
        proc = subprocess.run([sys.executable, "-m", "qlora.cli", "generate", f"model={four_bit}", "prompt=x",
                               "max_new_tokens=2", "device=cpu"], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, QLORA_BACKEND=backend, TRITON_INTERPRET="0"))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert last_line(proc.stderr).startswith("error: QLORA_BACKEND"), proc.stderr[-500:]


# ---- data ----------------------------------------------------------------------------------
def test_malformed_empty_and_incomplete_data(tmp_path):
    from qlora.data import DataError, InstructionFormat, load_records

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion": "b"}\n')
    with pytest.raises(DataError, match=r"data file '.*bad\.jsonl' line 2: invalid JSON \(Expecting property name"):
        load_records(bad, eval_fraction=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"data file '.*empty\.jsonl' is empty"):
        load_records(empty, eval_fraction=0)
    incomplete = tmp_path / "incomplete.jsonl"
    incomplete.write_text('{"instruction": "a", "input": "x", "output": "b"}\n{"instruction": "c", "input": "y"}\n')
    records, _ = load_records(incomplete, eval_fraction=0)
    with pytest.raises(DataError, match=r"record 1: missing field 'output' \(fields present: input, instruction\);"):
        InstructionFormat().render(records[1], 1)


# ---- models ----------------------------------------------------------------------------------
def test_missing_model_path_is_named_before_any_hub_lookup(assets, tmp_path):
    from qlora.errors import InputPathError

    with pytest.raises(InputPathError, match=r"model\.name_or_path=.*nowhere: checkpoint directory does not exist"):
        train(assets, tmp_path / "run", **{"model.name_or_path": str(tmp_path / "nowhere")})


def test_offline_hub_id_fails_fast_saying_how_to_use_a_local_directory(assets, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from qlora.errors import NetworkError
    from qlora.models.checkpoint import resolve_checkpoint

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(NetworkError, match=r"HF_HUB_OFFLINE is set and 'huggyllama/llama-7b' is not a local "
                                           r"directory.*pass model\.name_or_path=<dir>"):
        train(assets, tmp_path / "run", **{"model.name_or_path": "huggyllama/llama-7b"})
    assert time.perf_counter() - started < 20  # was 52 s of retries; most of this is building the accelerator
    # No network: a closed local port stands in for an unreachable Hub, refused at once.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(NetworkError, match=r"http://127\.0\.0\.1:9 cannot be reached \(offline\?\) and"):
        resolve_checkpoint("someone/model", option="model.name_or_path")
    assert time.perf_counter() - started < 5


def test_truncated_model_is_one_line(assets, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(assets[0], model)
    truncate(model / "model.safetensors", 0.6)
    args = [o for o in overrides(model, assets[1], tmp_path / "run")]
    proc = train_py(args, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    line = last_line(err)
    assert line.startswith(f"error: model.name_or_path={model}: {model / 'model.safetensors'}") and "truncated" in line
    assert "Traceback" not in err


# ---- checkpoints ---------------------------------------------------------------------------
def test_checkpoints_carry_a_manifest_and_no_pickle(trained):
    from qlora.train.checkpoint import MANIFEST_FILE, verify

    checkpoint = trained / "checkpoints" / "step-000004"
    files = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert set(files) == on_disk and all(len(f["sha256"]) == 64 for f in files.values())
    assert not list(checkpoint.rglob("*.pt")) and not list(checkpoint.rglob("*.bin"))
    assert verify(checkpoint) is None and verify(trained / "adapter") is None


def test_manifest_catches_truncation_and_a_flipped_byte(trained, tmp_path):
    from qlora.train.checkpoint import verify

    checkpoint = shutil.copytree(trained / "checkpoints" / "step-000004", tmp_path / "step-000004")
    weights = checkpoint / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify(checkpoint) == "adapter/adapter_model.safetensors does not match its sha256 in the manifest"
    checkpoint = shutil.copytree(trained / "checkpoints" / "step-000004", tmp_path / "again" / "step-000004")
    truncate(checkpoint / "optimizer.safetensors")
    assert verify(checkpoint).startswith("optimizer.safetensors has ") and "bytes, the manifest says" in verify(checkpoint)


@pytest.mark.parametrize("damaged", ["adapter/adapter_model.safetensors", "optimizer.safetensors"])
def test_resume_skips_a_damaged_checkpoint_naming_it(trained, assets, tmp_path, damaged, caplog):
    first = copy_run(trained, tmp_path)
    truncate(first / "checkpoints" / "step-000004" / damaged)
    second = first.parent / "second"
    with caplog.at_level("WARNING", logger="qlora.train"):
        train(assets, second, **{"trainer.max_steps": 6, "trainer.resume": "true", "trainer.eval_every": 0})
    assert f"checkpoint {first / 'checkpoints' / 'step-000004'} is damaged: {damaged} has" in caplog.text
    assert sorted(losses(second)) == [3, 4, 5, 6]  # resumed from step 2, the intact one


def test_resume_with_no_intact_checkpoint_fails_naming_each(trained, assets, tmp_path):
    from qlora.train.checkpoint import CheckpointError

    first = copy_run(trained, tmp_path)
    truncate(first / "checkpoints" / "step-000004" / "rng.safetensors")
    (first / "checkpoints" / "step-000002" / "scheduler.json").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint; damaged: .*step-000004 \(rng\.safetensors has "
                                              r".*step-000002 \(scheduler\.json is missing\)"):
        train(assets, first.parent / "second", **{"trainer.max_steps": 6, "trainer.resume": "true"})
    assert not (first.parent / "second").exists()


def test_resume_with_nothing_left_to_train_says_so(trained, assets, tmp_path):
    first = copy_run(trained, tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint .*step-000004 is already at step 4, and trainer\.max_steps=4 "
                                          r"leaves nothing to train; set trainer\.max_steps above 4"):
        train(assets, first.parent / "second", **{"trainer.max_steps": 4, "trainer.resume": "true"})
    assert not (first.parent / "second").exists()


class _Payload:
    """Unpickling this runs `open(marker, "w")`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _legacy_checkpoint(trained, tmp_path, optimizer_state) -> Path:
    """A checkpoint in the earlier layout (pickled .pt states, no manifest)."""
    from qlora.train.state_io import load_state

    source = trained / "checkpoints" / "step-000004"
    legacy = tmp_path / "legacy" / "checkpoints" / "step-000004"
    shutil.copytree(source / "adapter", legacy / "adapter")
    shutil.copy2(source / "trainer_state.json", legacy / "trainer_state.json")
    torch.save(optimizer_state if optimizer_state is not None else load_state(source, "optimizer"),
               legacy / "optimizer.pt")
    torch.save(load_state(source, "scheduler"), legacy / "scheduler.pt")
    torch.save(load_state(source, "rng"), legacy / "rng.pt")
    return legacy


def test_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(trained, assets, tmp_path):
    from qlora.train.checkpoint import CheckpointError

    marker = tmp_path / "payload-ran"
    legacy = _legacy_checkpoint(trained, tmp_path, {"state": {}, "param_groups": [], "x": _Payload(str(marker))})
    with pytest.raises(CheckpointError, match=r"optimizer\.pt was refused: .*could run code"):
        train(assets, tmp_path / "second", **{"trainer.max_steps": 6, "trainer.resume": str(legacy)})
    assert not marker.exists()
    # The payload is real: the unpickler resume used before would have run it.
    torch.load(legacy / "optimizer.pt", weights_only=False)
    assert marker.exists()


def test_earlier_layout_checkpoint_still_resumes(trained, assets, tmp_path):
    legacy = _legacy_checkpoint(trained, tmp_path, None)
    run_dir = tmp_path / "second"
    train(assets, run_dir, **{"trainer.max_steps": 5, "trainer.resume": str(legacy), "trainer.eval_every": 0})
    assert sorted(losses(run_dir)) == [5]


def test_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    from qlora.train.state_io import load_state, save_state

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}, 1: {"n": 2}},
             "param_groups": [{"betas": (0.9, 0.999), "lr": float("inf"), "params": [0, 1], "name": None}],
             "numpy": np.random.get_state(), "python": random.getstate()}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["state"][0]["exp_avg"].equal(state["state"][0]["exp_avg"]) and back["state"][1] == {"n": 2}
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["lr"] == float("inf")
    assert back["python"] == state["python"]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    np.random.set_state(back["numpy"])


# ---- no poisoned state -----------------------------------------------------------------------
def test_huge_lr_on_the_embedded_default_leaves_only_finite_loadable_checkpoints(tmp_path):
    from qlora.train import compose_recipe, run
    from qlora.train.checkpoint import verify
    from qlora.train.trainer import NonFiniteLossError

    run_dir = tmp_path / "run"
    # lr=1e30: the first update moves LoRA A and B by ~1e30 each, so their product overflows on the next
    # forward in any dtype. A milder lr (1e6) can instead saturate the final RMSNorm (x**2 -> inf, rsqrt -> 0):
    # uniform logits, a finite ln(vocab) loss and zero gradients from then on, which never trips the guard.
    cfg = compose_recipe(["optimizer.lr=1e30", "trainer.save_every=1", "trainer.max_steps=8", "trainer.eval_every=0",
                          "trainer.exact_match_examples=0", "trainer.eval_samples=0", "quantization.compute_dtype=float32"])
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+); the update was not applied\. Last good checkpoint: "
                                                 r".*step-0000\d\d\.") as raised:
        run(cfg, run_dir=run_dir)
    named = Path(str(raised.value).split("Last good checkpoint: ")[1].split(". ")[0])
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints and named == checkpoints[-1]
    for checkpoint in checkpoints:
        assert verify(checkpoint) is None
        for name, tensor in load_file(checkpoint / "adapter" / "adapter_model.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint, name)
        for name, tensor in load_file(checkpoint / "optimizer.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint, name)


def test_nonfinite_skip_drops_steps_then_stops(assets, tmp_path, caplog):
    from qlora.train.trainer import NonFiniteLossError

    run_dir = tmp_path / "run"
    extra = {"optimizer.lr": 1.0e30, "trainer.max_grad_norm": 0, "trainer.max_steps": 40, "trainer.save_every": 1,
             "trainer.nonfinite": "skip", "trainer.max_nonfinite_skips": 2, "trainer.eval_every": 0}
    with caplog.at_level("WARNING", logger="qlora.train"), \
            pytest.raises(NonFiniteLossError, match=r"3 steps in a row; trainer\.max_nonfinite_skips=2 reached"):
        train(assets, run_dir, **extra)
    assert caplog.text.count("the update was skipped") == 2
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        for tensor in load_file(checkpoint / "adapter" / "adapter_model.safetensors").values():
            assert torch.isfinite(tensor).all()


# ---- staging: kill -9, junk, permissions, error paths --------------------------------------------
def _killed_mid_write(output_dir: Path) -> None:
    """A writer SIGKILLed halfway through a staged write: forked, so it needs no second import of the stack
    (it touches only the filesystem, which is safe after fork)."""
    from qlora.staging import staged_directory

    pid = os.fork()
    if pid == 0:
        try:
            with staged_directory(output_dir) as staging:
                (staging / "adapter_model.safetensors").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)  # never return into the test runner
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_kill9_mid_checkpoint_write_keeps_the_old_one_and_leaves_no_junk(tmp_path):
    from qlora.staging import staged_directory

    root = tmp_path / "checkpoints"
    with staged_directory(root / "step-000002") as staging:
        (staging / "done").write_text("complete")
    for name in ("step-000002", "step-000004"):  # replacing an existing one, and writing a new one
        _killed_mid_write(root / name)
        # What this writer left; the previous one's leftovers went with this write.
        assert [p.name.split(".qlora-")[0] for p in root.iterdir() if p.name.startswith(".")] == [f".{name}"]
    assert (root / "step-000002" / "done").read_text() == "complete" and not (root / "step-000004").exists()
    with staged_directory(root / "step-000006") as staging:
        (staging / "done").write_text("complete")
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000006"]


def test_kill9_mid_export_then_export_again(trained, tmp_path):
    qlora = shutil.which("qlora", path=os.path.dirname(sys.executable)) or shutil.which("qlora")
    if qlora is None:
        pytest.skip("the qlora console script is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([qlora, "export", f"run_dir={trained}", "output_dir=merged", "format=nf4",
                             "progress=false"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(tmp_path.glob(".merged.qlora-*"))) < 2:  # the staging folder and the dense work folder
        assert proc.poll() is None and time.time() < deadline, "the export ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "merged").exists() and list(tmp_path.glob(".merged.qlora-*"))
    from qlora.export import export_merged

    export_merged(trained, tmp_path / "merged", format="nf4", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (tmp_path / "merged" / "config.json").is_file()


def test_outputs_follow_the_umask_and_write_errors_name_the_output(tmp_path):
    import errno

    from qlora.staging import OutputWriteError, staged_directory

    from safetensors.torch import save_file

    previous = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "out") as staging:
            (staging / "f").write_text("x")
            (staging / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, staging / "sub" / "model.safetensors")  # safetensors writes 0600
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*")}
    assert modes == {"f": 0o644, "sub": 0o755, "model.safetensors": 0o644}
    with pytest.raises(OutputWriteError, match=rf"could not write {tmp_path / 'full'}: No space left on device$"):
        with staged_directory(tmp_path / "full") as staging:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "model.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_says_how_to_continue(assets, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(*assets, run_dir, **{"trainer.max_steps": 400, "trainer.save_every": 2, "trainer.eval_every": 0})
    proc = train_py(args, tmp_path)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = last_line(err)
    assert line.startswith("error: interrupted at step ") and "newest checkpoint: " in line
    # The exact command that continues this run: the same overrides, trainer.resume= this run's checkpoint.
    command = line.split("To continue this run: ", 1)[1]
    checkpoint = line.split("newest checkpoint: ", 1)[1].split(". To continue", 1)[0]
    assert Path(checkpoint).parent == run_dir / "checkpoints"
    assert shlex.split(command) == ["python", TRAIN, *args, f"trainer.resume={checkpoint}"]


def test_resume_true_continues_the_run_written_last_not_the_one_that_got_furthest(trained, tmp_path):
    # An older run of the same name reached step 4; the interrupted one wrote step 2 after it.
    runs = tmp_path / "runs"
    older = copy_run(trained, tmp_path)
    interrupted = runs / "second" / "checkpoints" / "step-000002"
    shutil.copytree(older / "checkpoints" / "step-000002", interrupted)
    for path in (interrupted / "manifest.json",):
        os.utime(path, (time.time() + 5, time.time() + 5))
    assert ckpt.find_resume_checkpoint(True, runs / "third") == interrupted


def test_a_resume_that_changes_the_model_is_refused_naming_the_keys(trained):
    # quantization=int8 on an NF4 run trained the adapter on another base without a word; another lora.r
    # died in a 106-line traceback of size mismatches.
    from qlora.train.checkpoint import CheckpointError

    checkpoint = trained / "checkpoints" / "step-000002"
    recorded = OmegaConf.load(trained / "config.yaml")
    for override, named in (("lora.r=16", f"lora.r: {recorded.lora.r} -> 16"),
                            ("quantization.quant_type=int8", "quantization.quant_type: 'nf4' -> 'int8'")):
        with pytest.raises(CheckpointError, match=re.escape(named)):
            ckpt.check_resume_compatible(checkpoint, OmegaConf.merge(recorded, OmegaConf.from_dotlist([override])))
    schedule = OmegaConf.merge(recorded, OmegaConf.from_dotlist(["trainer.max_steps=9", "optimizer.lr=0.0123"]))
    assert ckpt.check_resume_compatible(checkpoint, schedule) == [
        f"optimizer.lr: {recorded.optimizer.lr!r} -> 0.0123", f"trainer.max_steps: {recorded.trainer.max_steps} -> 9"]


# ---- the CLI ---------------------------------------------------------------------------------
def test_cli_refuses_bad_values_and_wrong_folders(trained, tmp_path, capsys):
    from qlora.cli import main

    for args, code, message in [
        (["generate", f"model={trained}", "prompt=w1", "temperature=-1"], 2, "error: temperature=-1 must be >= 0"),
        (["generate", f"model={trained}", "prompt=w1", "top_p=0"], 2, "error: top_p=0 must be > 0 and <= 1"),
        (["generate", f"model={trained}", "prompt=w1", "max_new_tokens=0"], 2, "error: max_new_tokens=0 must be > 0"),
        (["export", f"run_dir={trained.parent}", "output_dir=o"], 1,
         f"error: run_dir={trained.parent} holds 1 training run(s), not one; pass one of them, e.g. run_dir={trained} "
         "(the newest)"),
        (["export", f"run_dir={trained}", "output_dir=o", "format=onnx"], 2,
         "error: format='onnx' is not one of hf, nf4, int8, gguf"),
    ]:
        assert main(args) == code, args
        assert capsys.readouterr().err.strip() == message
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "model-f16.gguf").write_bytes(b"GGUF")
    assert main(["generate", f"model={gguf_dir}", "prompt=w1"]) == 1
    assert capsys.readouterr().err.strip().startswith(f"error: model={gguf_dir} holds a GGUF file (model-f16.gguf)")


def test_export_refuses_a_damaged_adapter(trained, tmp_path, capsys):
    from qlora.cli import main

    run = shutil.copytree(trained, tmp_path / "run")
    truncate(run / "adapter" / "adapter_model.safetensors")
    assert main(["export", f"run_dir={run}", f"output_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: adapter {run / 'adapter'} is damaged: adapter_model.safetensors has")
    assert not (tmp_path / "out").exists()


def test_generation_formats_prompts_as_the_run_trained(trained):
    from transformers import AutoTokenizer

    from qlora.cli import generation_prompt
    from qlora.data import InstructionFormat, PromptCompletionFormat
    from qlora.data.formats import load_prompt_format

    recorded = load_prompt_format(trained / "adapter")
    assert isinstance(recorded, PromptCompletionFormat)
    tokenizer = AutoTokenizer.from_pretrained(trained / "adapter")
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}"
    instruction = InstructionFormat()
    assert generation_prompt(tokenizer, instruction, "[1, 2, 3]", "auto") == (
        "### Instruction:\n[1, 2, 3]\n\n### Response:\n", True)
    assert generation_prompt(tokenizer, instruction, "w1", "true")[0] == "<s>w1"  # asked for: the chat template
    assert generation_prompt(tokenizer, None, "w1", "auto")[0] == "<s>w1"  # nothing recorded: as before
    assert generation_prompt(tokenizer, instruction, "w1", "false") == ("w1", True)


# ---- typed seams -----------------------------------------------------------------------------
def test_train_run_is_always_the_function():
    import inspect

    import qlora.train.runner  # noqa: F401 (importing the submodule must not rebind the name)
    from qlora.train import run

    assert inspect.isfunction(run)


def test_output_dir_is_the_name_and_out_dir_still_works():
    from qlora.export import deprecated_alias

    with pytest.warns(FutureWarning, match="out_dir= is deprecated; use output_dir="):
        assert deprecated_alias(None, "merged", "output_dir", "out_dir", "export_merged") == "merged"
    with pytest.raises(UserError, match="both output_dir=a and out_dir=b given"):
        deprecated_alias("a", "b", "output_dir", "out_dir", "export_merged")


def test_an_edited_adapter_config_is_a_note_and_a_changed_shape_is_refused(trained, tmp_path, caplog):
    # Users edit adapter_config.json (base_model_name_or_path after moving the base): that adapter is good.
    import logging

    from qlora.export.source import verify_adapter
    from qlora.train.checkpoint import CheckpointError

    run = shutil.copytree(trained, tmp_path / "run")
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "/moved/base/model-with-a-longer-name"
    config_path.write_text(json.dumps(config, indent=4))
    with caplog.at_level(logging.WARNING, logger="qlora.train"):
        verify_adapter(run / "adapter")
    assert "was edited after training (changed: base_model_name_or_path" in caplog.text
    config["r"] = config["r"] * 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"edited in keys that no longer match the trained weights \(r 4 -> 8\)"):
        verify_adapter(run / "adapter")
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json is not valid JSON any more"):
        verify_adapter(run / "adapter")


def test_a_missing_data_file_is_one_line_before_the_model_loads_and_leaves_no_run_folder(assets, trained, tmp_path):
    # It was a 26-line traceback after the model had loaded, and left an empty run folder behind.
    missing = tmp_path / "nowhere" / "train.jsonl"
    args = overrides(*assets, tmp_path / "run")
    args = [a for a in args if not a.startswith("data.source=")] + [f"data.source={missing}"]
    proc = train_py(args, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert last_line(err) == f"error: data source '{missing}' does not exist; check the path (relative paths are " \
                             f"resolved from {tmp_path})"
    assert "loading (" not in err and not (tmp_path / "run").exists()
    proc = subprocess.run([sys.executable, "-m", "qlora.cli", "eval", f"run_dir={trained}", f"data={missing}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "loading (" not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith(f"error: data source '{missing}' does not exist")


def test_an_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_continue():
    from qlora.train.invocation import interrupted_message

    message = interrupted_message(3, None)
    assert message.startswith("interrupted at step 3, before any checkpoint was written: there is nothing to continue")
    assert "trainer.resume" not in message
