"""DDP and FSDP2 on CPU with gloo, 2 processes: losses equal to one process, the base sharded
byte-exact, a dead rank fails the other, sharded checkpoints resume exactly, the adapter exports.

Loss tolerance. Each rank's micro-batches are the single process's micro-batches (same examples,
same padding), so every micro-batch's loss sum is bit-identical; what differs is the order in
which 4 loss sums are added (fp64 here) and in which gradients are summed (fp32: gloo's
all-reduce after a local sum of 2, instead of a local sum of 4). The first step's loss is
therefore identical, and later ones differ only through the parameters' fp32 rounding after each
update: relative differences of a few fp32 ulps of the gradients (2^-24 ~ 6e-8 each), carried into
the loss scaled by lr x steps. We allow rel=1e-6 (about 16 ulps), the same bound the single-process
resume test uses; a wrong normalisation or a wrong example shows up as 1e-3 or more.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlora.train.schema import ConfigError, register
from tiny_run import WORDS, write_copy_task

ROOT = Path(__file__).resolve().parents[1]
register()
LOSS_RTOL = 1e-6
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_model(directory: Path) -> Path:
    """A Llama wide enough (hidden 256) that the packed weights, not the replicated code tables,
    make up the base, with the tiny word-level tokenizer of tiny_run."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return save_model(base / "model"), write_copy_task(base / "task.jsonl")


def overrides(assets, run_dir: Path, world: int, **extra) -> list[str]:
    model_dir, data_file = assets
    values = {
        "model.name_or_path": model_dir, "model.dtype": "float32", "data.source": data_file,
        "data.format._target_": "qlora.data.PromptCompletionFormat", "data.max_seq_len": 32,
        "data.eval_fraction": 0.1, "trainer.max_steps": STEPS, "trainer.micro_batch_size": 4,
        # the same global batch of 16 for any world size
        "trainer.gradient_accumulation_steps": 4 // world, "trainer.eval_every": 0, "trainer.save_every": 2,
        "trainer.eval_samples": 1, "trainer.max_new_tokens": 4, "trainer.exact_match_examples": 0,
        "lora.r": 4, "lora.dropout": 0.0, "optimizer.lr": 3e-3, "hydra.run.dir": run_dir, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in rows if "loss" in m}


def _env(**extra) -> dict:
    # One thread per process: 2 processes on 2 cores.
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def torchrun(assets, run_dir: Path, strategy: str, **extra) -> subprocess.CompletedProcess:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(ROOT / "train.py"), *overrides(assets, run_dir, 2, **extra), f"distributed={strategy}"]
    done = subprocess.run(command, cwd=str(run_dir.parent), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def start_ranks(assets, run_dir: Path, strategy: str, **extra) -> list[subprocess.Popen]:
    """Two ranks started the way torchrun starts them (its environment variables), without its agent."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides(assets, run_dir, 2, **extra),
                              f"distributed={strategy}"], cwd=str(run_dir.parent),
                             env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    """The single-process reference run (in this process), global batch 16."""
    from hydra import compose, initialize_config_dir

    from qlora.train import run

    run_dir = tmp_path_factory.mktemp("single") / "run"
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[o for o in overrides(assets, run_dir, 1) if "hydra." not in o])
    summary = run(cfg, run_dir=run_dir)
    return run_dir, summary


@pytest.fixture(scope="module")
def fsdp2(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp2") / "straight"
    torchrun(assets, run_dir, "fsdp2")
    return run_dir


def assert_same_losses(expected: dict, got: dict, steps) -> None:
    assert sorted(got) == list(steps), sorted(got)
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), (step, got[step], expected[step])


# ---- launch and config errors -------------------------------------------------------------------

def test_bad_launches_say_how_to_launch(monkeypatch):
    from qlora.distributed import check_launch
    from qlora.train.recipes import compose_recipe

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"distributed=fsdp2 needs .*torchrun --nproc_per_node=<N> train.py"):
        check_launch("fsdp2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2\) but distributed=none.*distributed=ddp"):
        check_launch("none")
    with pytest.raises(ConfigError, match=r"distributed.cpu_offload=true is an FSDP2 option"):
        compose_recipe(["distributed=ddp", "distributed.cpu_offload=true"])
    with pytest.raises(ConfigError, match=r"trainer.chunked_loss=true .* distributed=fsdp2"):
        compose_recipe(["distributed=fsdp2", "trainer.chunked_loss=true"])


# ---- the packed bytes cross ranks bit for bit ---------------------------------------------------

def test_packed_bytes_gathered_from_shards_are_bit_exact(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(ROOT / "tests" / "distributed_workers.py"), "gather_bytes", str(tmp_path)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = [row for rank in range(2) for row in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    assert len(results) == 2 * 4 * 3
    for row in results:
        where = f"rank {row['rank']}, storage {row['storage']}, param_dtype {row['param_dtype']}"
        assert row["gathered_equal"], f"{where}: all-gathered packed bytes differ from the unsharded ones"
        assert row["local_bytes"] == row["total_bytes"] // 2, where
        assert row["same_output"], f"{where}: the sharded layer computes something else"
        # Without the byte view, FSDP2 casts float storage to a different param_dtype: the failure
        # this guards against (bytes changed, or a weight of the wrong size).
        if row["storage"] != "torch.uint8" and row["param_dtype"] not in ("None", row["storage"]):
            assert not row["naive_equal"], where


# ---- training: same losses as one process ---------------------------------------------------------

def test_fsdp2_losses_equal_single_process_and_base_is_halved(single, fsdp2):
    single_dir, single_summary = single
    assert_same_losses(losses(single_dir), losses(fsdp2), range(1, STEPS + 1))
    summary = json.loads((fsdp2 / "summary.json").read_text())
    assert summary["world_size"] == 2 and single_summary["world_size"] == 1
    ratio = summary["base_bytes_per_rank"] / single_summary["base_bytes_per_rank"]
    # Half of the sharded parameters, plus the replicated quantization scales and code tables (5% here).
    assert 0.5 <= ratio < 0.56, ratio
    # One plain PEFT adapter, written once, and checkpoints sharded through DCP.
    assert (fsdp2 / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (fsdp2 / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (fsdp2 / "checkpoints" / "step-000004" / "dcp" / ".metadata").is_file()


def test_ddp_losses_equal_single_process(single, assets, tmp_path):
    single_dir, _ = single
    run_dir = tmp_path / "ddp"
    # With gradient checkpointing (and activation offload, a no-op on CPU): in fp32 the recompute
    # reproduces the forward exactly, so the bound is the same.
    torchrun(assets, run_dir, "ddp", **{"trainer.save_every": 0, "trainer.gradient_checkpointing": "true",
                                        "trainer.activation_offload": "true"})
    assert_same_losses(losses(single_dir), losses(run_dir), range(1, STEPS + 1))


def test_adapter_matches_single_process_and_exports(single, fsdp2, tmp_path):
    from safetensors.torch import load_file

    single_dir, _ = single
    expected = load_file(str(single_dir / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(fsdp2 / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected)
    for key in got:
        # Adam moves each element by about lr per step whatever its gradient's size, so where a
        # gradient is near 0 an ulp-level difference in it changes that element's step by a visible
        # fraction of lr (2.4e-4 relative, 0.3% of lr, on one element of 1024 here). Bound: no element
        # differs by more than 1% of one step (lr / 100) after 4 steps.
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=3e-3 / 100)
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "export", f"run_dir={fsdp2}", f"out={out}"],
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert any(out.glob("*.safetensors")), list(out.iterdir())


# ---- failures: a dead rank, and resuming a sharded run ----------------------------------------

def test_dead_rank_fails_the_other_and_the_run_resumes_exactly(assets, fsdp2, tmp_path):
    first = tmp_path / "resumed" / "first"
    ranks = start_ranks(assets, first, "fsdp2", **{"distributed.timeout_s": 60})
    deadline = time.time() + 240
    while not (first / "checkpoints" / "step-000002" / "trainer_state.json").exists():
        assert all(r.poll() is None for r in ranks) and time.time() < deadline, ranks[0].communicate()[0][-3000:]
        time.sleep(0.02)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[1].wait()
    killed_at = time.time()
    out, _ = ranks[0].communicate(timeout=120)
    assert ranks[0].returncode != 0, out[-3000:]
    assert time.time() - killed_at < 60, "rank 0 outlived its peer by more than distributed.timeout_s"
    assert "lost contact with its peers" in out, out[-3000:]
    assert "error: rank 0 of 2" in out and "Traceback" not in out.split("error: rank 0 of 2")[-1], out[-2000:]

    resumed = tmp_path / "resumed" / "second"
    torchrun(assets, resumed, "fsdp2", **{"trainer.resume": "true"})
    expected, got = losses(fsdp2), losses(resumed)
    assert min(got) >= 3 and sorted(got) == list(range(min(got), STEPS + 1)), sorted(got)
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-7, abs=1e-7), step
