"""Worker programs the distributed tests start under torchrun (a script, so that the workers never
re-import the test runner): `python -m torch.distributed.run --nproc_per_node=2 distributed_workers.py
gather_bytes OUT_DIR`."""
import json
import os
import pathlib
import sys

# This folder is on sys.path as the script's own; the repository root must not be (kernels/).
import torch
import torch.distributed as dist


def _layer(storage, x):
    from qlora.nn import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit(192, 96, bias=False, compute_dtype=torch.float32, quant_storage=storage)
    layer.set_weight(torch.randn(96, 192))
    raw = layer.weight.detach().view(torch.uint8).reshape(-1)
    # Every byte value, so every NaN bit pattern of the storage dtype, signalling ones included:
    # bf16 0x7F81 (little-endian bytes 81 7F) is a signalling NaN that a float cast would quiet.
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    raw[:4] = torch.tensor([0x81, 0x7F, 0x81, 0xFF], dtype=torch.uint8)
    return layer, raw.clone(), layer(x)


def gather_bytes(out_dir: str) -> None:
    """For each storage dtype and mixed-precision param dtype: shard a 4-bit layer whose packed bytes
    hold every bit pattern, all-gather it, and compare bytes and outputs with the unsharded layer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qlora.distributed.sharding import hold_packed_as_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(2))
    rows = []
    for storage in (torch.uint8, torch.bfloat16, torch.float16, torch.float32):
        for param_dtype in (None, torch.bfloat16, torch.float32):
            policy = MixedPrecisionPolicy(param_dtype=param_dtype)
            layer, expected, reference = _layer(storage, x)
            model = torch.nn.Sequential(layer, torch.nn.Linear(96, 4))
            hold_packed_as_bytes(model)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            local = layer.weight.to_local()
            model.unshard()
            gathered = layer.weight.detach().view(torch.uint8).reshape(-1)
            row = {"rank": rank, "storage": str(storage), "param_dtype": str(param_dtype),
                   "gathered_equal": torch.equal(gathered, expected), "total_bytes": expected.numel(),
                   "local_bytes": local.numel() * local.element_size(), "same_output": torch.equal(layer(x), reference)}
            model.reshard()
            # The same layer sharded as it is (float storage as a float Parameter), for contrast.
            naive, expected, _ = _layer(storage, x)
            naive_model = torch.nn.Sequential(naive, torch.nn.Linear(96, 4))
            fully_shard(naive_model, mesh=mesh, mp_policy=policy)
            naive_model.unshard()
            weight = naive.weight.detach()
            row["naive_equal"] = weight.numel() * weight.element_size() == expected.numel() and torch.equal(
                weight.contiguous().view(torch.uint8).reshape(-1), expected)
            naive_model.reshard()
            rows.append(row)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def gather_expert_bytes(out_dir: str, model_dir: str) -> None:
    """fully_shard a tiny MoE with 4-bit expert stacks as the trainer does: each rank holds whole experts
    (half the packed bytes); gathered, the bytes and the logits are the unsharded model's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import qlora
    from qlora.nn.experts import quantized_stacks

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = qlora.load_model(model_dir, device="cpu", progress=False)
    model = qlora.load_model(model_dir, device="cpu", progress=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rows = []
    for (name, module, attr), (_, ref_module, _) in zip(quantized_stacks(model), quantized_stacks(reference)):
        param = module._parameters[attr]
        local = param.to_local()
        rows.append({"name": f"{name}.{attr}", "local_bytes": local.numel() * local.element_size(),
                     "total_bytes": ref_module._parameters[attr].numel(), "local_rows": local.shape[0]})
    for layer in model.model.layers:  # each decoder layer is its own group
        layer.unshard()
    gathered = [torch.equal(module._parameters[attr].detach(), ref._parameters[attr])
                for (_, module, attr), (_, ref, _) in zip(quantized_stacks(model), quantized_stacks(reference))]
    for layer in model.model.layers:
        layer.reshard()
    with torch.no_grad():
        logits = model(ids).logits
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"stacks": rows, "gathered_equal": all(gathered), "same_logits": torch.equal(logits, expected)}, f)
    dist.destroy_process_group()


def _local_state(model) -> dict:
    """name -> this rank's tensor: shards of the parameters (packed bytes viewed as bytes), the
    quantized layers' state buffers and every other buffer."""
    state = {}
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        state[name] = local.detach().clone()
    for name, buffer in model.named_buffers(remove_duplicate=False):  # code tables may be shared
        if buffer is not None:
            state["buffer:" + name] = buffer.detach().clone()
    return state


def build_state(out_dir: str, *overrides: str) -> None:
    """Build a run's model as the trainer does (runner.build) with `overrides` (distributed=fsdp2
    ...), then save this rank's local tensors and its RSS growth over the build to OUT_DIR."""
    from qlora import distributed as qdist
    from qlora.train.recipes import compose_recipe
    from qlora.train.runner import build

    torch.set_num_threads(1)
    cfg = compose_recipe(list(overrides))
    world = qdist.setup(cfg.distributed.strategy, cfg.trainer.device, cfg.distributed.timeout_s)
    # What build() imports lazily (PEFT, datasets, the model's code) is imported before the baseline,
    # so that the RSS growth is the model's.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoConfig

    from qlora.models.loading import build_skeleton

    build_skeleton(AutoConfig.from_pretrained(cfg.model.name_or_path), torch.float32, False)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM restarts from the current RSS
        f.write("5")
    before = _status_bytes("VmRSS")
    setup = build(cfg, pathlib.Path(out_dir))
    peak = _status_bytes("VmHWM")
    from qlora.distributed.sharding import base_bytes_per_rank

    torch.save({"state": _local_state(setup.model), "rss_before": before, "rss_peak": peak,
                "shard_bytes": base_bytes_per_rank(setup.model)}, os.path.join(out_dir, f"rank{world.rank}.pt"))
    qdist.teardown(world)


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


if __name__ == "__main__":
    {"gather_bytes": gather_bytes, "build_state": build_state,
     "gather_expert_bytes": gather_expert_bytes}[sys.argv[1]](*sys.argv[2:])
    # As train.py does: the results are written, and the interpreter's teardown is skipped. Here it
    # also sidesteps an occasional abort in gloo's thread shutdown at exit ("terminate called without
    # an active exception", seen once in seven runs at OMP_NUM_THREADS=1) after everything had passed.
    from qlora.fast_exit import exit_process

    exit_process(0)
