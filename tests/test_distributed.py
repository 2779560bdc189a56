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
        # fp32 compute (not the default's auto, bf16 on CPUs with bf16 units): LOSS_RTOL is fp32's.
        "model.name_or_path": model_dir, "model.dtype": "float32", "quantization.compute_dtype": "float32",
        "data.source": data_file,
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


def start_ranks(assets, run_dir: Path, strategy: str, per_node: int = 2, **extra) -> list[subprocess.Popen]:
    """Two ranks started the way torchrun starts them (its environment variables), without its agent;
    per_node=1 makes them look like one process on each of two nodes."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides(assets, run_dir, 2, **extra),
                              f"distributed={strategy}"], cwd=str(run_dir.parent),
                             env=_env(RANK=str(rank), LOCAL_RANK=str(rank % per_node), WORLD_SIZE="2",
                                      LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]


def build_states(assets_model: Path, data_file: Path, out_dir: Path, *extra: str) -> list[dict]:
    """Each rank's model as runner.build makes it under distributed=fsdp2 (+ extra): its local
    tensors, its RSS growth over the build and base_bytes_per_rank (tests/distributed_workers.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(ROOT / "tests" / "distributed_workers.py"), "build_state", str(out_dir),
               f"model.name_or_path={assets_model}", "model.dtype=bfloat16", f"data.source={data_file}",
               "data.format._target_=qlora.data.PromptCompletionFormat", "data.max_seq_len=32", "lora.r=4",
               "distributed=fsdp2", *extra]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


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
    with pytest.raises(ConfigError, match=r"low_memory_load=true .* distributed=fsdp2 only; with distributed=ddp"):
        compose_recipe(["distributed=ddp", "distributed.low_memory_load=true"])
    with pytest.raises(ConfigError, match=r"low_memory_load=true .* distributed=fsdp2 only; with distributed=none"):
        compose_recipe(["distributed.low_memory_load=true"])
    with pytest.raises(ConfigError, match=r"low_memory_load=true cannot be combined with lora.use_dora=true"):
        compose_recipe(["distributed=fsdp2", "distributed.low_memory_load=true", "lora.use_dora=true"])


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


# ---- low_memory_load: rank 0 reads, every rank receives its shards -----------------------------

def test_low_memory_load_is_bit_identical_to_the_normal_load(assets, tmp_path):
    model_dir, data_file = assets
    normal = build_states(model_dir, data_file, tmp_path / "normal")
    streamed = build_states(model_dir, data_file, tmp_path / "streamed", "distributed.low_memory_load=true")
    for rank in range(2):
        expected, got = normal[rank]["state"], streamed[rank]["state"]
        assert sorted(got) == sorted(expected)
        assert any(".base_layer.weight" in k for k in got) and any("absmax" in k for k in got)
        for key in got:
            # Packed bytes, quant state, dense weights, LoRA's initial values, rotary tables: every byte.
            a, b = got[key], expected[key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), (rank, key)
        assert streamed[rank]["shard_bytes"] == normal[rank]["shard_bytes"]


def test_low_memory_load_trains_like_the_normal_load_and_leaves_one_run_folder(fsdp2, assets, tmp_path):
    # A Hydra run folder named to the microsecond: each rank's Hydra would make its own, and only
    # rank 0's may exist (the others write nothing of their own).
    outputs = tmp_path / "low" / "outputs"
    done = torchrun(assets, tmp_path / "low" / "unused", "fsdp2", **{
        "distributed.low_memory_load": "true", "trainer.save_every": 0,
        "hydra.run.dir": str(outputs) + "/${now:%H-%M-%S-%f}"})
    folders = list(outputs.iterdir())
    assert len(folders) == 1, (folders, done.stdout[-2000:])
    assert not (tmp_path / "low" / ".hydra").exists() and not (tmp_path / "low" / "train.log").exists()
    # The same bytes and the same LoRA initialisation: the losses are the normal load's exactly.
    assert losses(folders[0]) == losses(fsdp2)


def test_low_memory_load_names_a_missing_tensor_before_sending_anything(assets, tmp_path):
    # Rank 0 checks every tensor's presence and shape first and every rank raises the same one-line
    # error (here one process: the check runs before any collective).
    import shutil

    from safetensors.torch import load_file, save_file

    import qlora
    from qlora.distributed import World
    from qlora.distributed.low_memory import _Streamer
    from qlora.errors import DamagedFileError

    broken = tmp_path / "broken"
    shutil.copytree(assets[0], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    model = qlora.load_model(broken, device="meta", progress=False)
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(DamagedFileError, match=r"no tensor for model.layers.1.mlp.down_proj.weight; it is incomplete"):
        _Streamer(model, model.qlora_unloaded, World(), torch.device("cpu")).run()


@pytest.mark.slow
def test_low_memory_load_peaks_near_a_shard_plus_one_streaming_tensor(assets, tmp_path):
    """Peak RSS growth over runner.build, per rank, on a 134M-parameter Llama (bf16, 8 layers of
    hidden 1024 / MLP 4096; the NF4 base is 80 MiB whole, 40 MiB per rank). Measured: normal load
    168 / 158 MiB (rank 0 / 1), low_memory_load 94 / 65 MiB."""
    import importlib.util
    import shutil

    from qlora.models.checkpoint import ShardReader

    spec = importlib.util.spec_from_file_location("streaming_load", ROOT / "benchmarks" / "streaming_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=4,
                       vocab_size=4000, tie_word_embeddings=False)
    model_dir = tmp_path / "model"
    bench.write_random_checkpoint(model_dir, layers=8, shard_bytes=64 << 20)
    for tokenizer_file in assets[0].glob("tokenizer*"):
        shutil.copy(tokenizer_file, model_dir)
    with ShardReader(model_dir) as reader:
        largest = max(torch.Size(reader.shape(k)).numel() for k in reader.keys()) * 2  # bf16: 8 MiB
    normal = build_states(model_dir, assets[1], tmp_path / "normal")
    streamed = build_states(model_dir, assets[1], tmp_path / "streamed", "distributed.low_memory_load=true")
    mib = 2**20
    for rank in range(2):
        grown = {name: run[rank]["rss_peak"] - run[rank]["rss_before"]
                 for name, run in (("normal", normal), ("streamed", streamed))}
        shard = streamed[rank]["shard_bytes"]
        # One streaming tensor: its read buffer (1x its bf16 bytes), NF4 + DQ quantization's temporaries
        # (an fp32 copy and per-element code indices: 3.1x measured) and its packed form and scatter
        # buffers (0.3x): 4.4x, bounded by 5x. Plus 40 MiB for what build() makes besides the base
        # (tokenized data, LoRA, optimizer and library objects: ~30 MiB measured on the tiny model).
        bound = shard + 5 * largest + 40 * mib
        report = {k: f"{v / mib:.0f} MiB" for k, v in {**grown, "shard": shard, "bound": bound}.items()}
        assert grown["streamed"] < bound, (rank, report)
        # The normal load holds the whole base on each rank at its peak; the streamed one saves at
        # least half of the half it never holds (allocator noise is a few MiB).
        whole = 2 * shard
        assert grown["streamed"] < grown["normal"] - (whole - shard) / 2, (rank, report)


# ---- FSDP2 options: CPU offload, and hybrid sharding across nodes --------------------------------

def test_cpu_offload_gives_single_process_losses(single, assets, tmp_path):
    # CPUOffloadPolicy on a CPU device: shards, gradients and the optimizer step stay in host memory
    # (no pinning); the arithmetic is the same as without it. Loaded with low_memory_load, whose
    # shards are then allocated in host memory.
    single_dir, _ = single
    run_dir = tmp_path / "offload"
    torchrun(assets, run_dir, "fsdp2", **{"distributed.cpu_offload": "true", "distributed.low_memory_load": "true",
                                          "trainer.save_every": 0})
    assert_same_losses(losses(single_dir), losses(run_dir), range(1, STEPS + 1))


def test_hybrid_shard_across_two_nodes_gives_single_process_losses(single, assets, tmp_path):
    # Two "nodes" of one process each (LOCAL_WORLD_SIZE=1): the HSDP mesh is 2 (replicate) x 1 (shard),
    # so each rank holds the whole base and gradients are all-reduced across the replicate dimension.
    # Loaded with low_memory_load: rank 0 sends each rank the shard of its coordinate on the 2-D mesh.
    single_dir, single_summary = single
    run_dir = tmp_path / "hybrid"
    ranks = start_ranks(assets, run_dir, "fsdp2", per_node=1, **{
        "distributed.hybrid_shard": "true", "distributed.low_memory_load": "true", "trainer.save_every": 0})
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "'replicate': 2, 'shard': 1" in outputs[0], outputs[0][-2000:]
    assert_same_losses(losses(single_dir), losses(run_dir), range(1, STEPS + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["base_bytes_per_rank"] == single_summary["base_bytes_per_rank"]
