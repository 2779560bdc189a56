"""DDP and FSDP2 around a PEFT model whose base is quantized.

FSDP2 (`fully_shard`) shards every parameter along dim 0 and all-gathers it before use; it casts
only floating-point parameters to the mixed-precision dtype and all-gathers a group of mixed dtypes
as bytes. A QuantizedLinear holds its packed bytes as its `weight` Parameter and its scales as
buffers (replicated: for NF4 with double quant they are 1 byte per 64 weights, 3% of the packed
bytes). Packed bytes stored as a float dtype (bitsandbytes' quant_storage=bfloat16 for FSDP1)
would be cast by a mixed-precision policy whose param_dtype differs (bf16 -> fp32 doubles the size
and quiets signalling NaNs), so before sharding every float-stored packed weight is re-held as a
uint8 view of the same bytes: FSDP2 then never casts it, copies it bit for bit, and the kernels
reinterpret any storage dtype as bytes anyway. The rows are whole 4-bit blocks (blocksize/2 bytes),
so shard boundaries never split a block. A 4-bit expert stack (qlora.nn.experts) is a uint8 Parameter
[experts, bytes per expert]: FSDP2 shards it along the experts, whole experts per rank, byte for byte.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from qlora.distributed.world import World
from qlora.nn.quantized import QuantizedLinear

log = logging.getLogger("qlora.distributed")


def quantized_layers(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def packed_rows(layer: QuantizedLinear, nbytes: int) -> int:
    """Bytes per row of the sharded packed weight: one 4-bit block when the size allows, else 1."""
    blocksize = getattr(layer, "blocksize", None)
    row = blocksize // 2 if blocksize else 1
    return row if row and nbytes % row == 0 else 1


def hold_packed_as_bytes(model: nn.Module) -> None:
    """Re-hold every quantized layer's float-stored (or 4-bit) packed Parameter as uint8 rows of
    whole blocks; integer data of other formats (int8, int32 GPTQ words) is left as it is, since
    FSDP2 never casts it."""
    for layer in quantized_layers(model):
        weight = layer.weight.detach()
        if not (weight.is_floating_point() or getattr(layer, "blocksize", None)):
            continue
        raw = weight.contiguous().reshape(-1).view(torch.uint8)
        layer.weight = nn.Parameter(raw.reshape(-1, packed_rows(layer, raw.numel())), requires_grad=False)


def base_bytes_per_rank(model: nn.Module) -> int:
    """Bytes of the frozen base one rank holds at rest: its shards of the frozen parameters (whole
    tensors when not sharded) plus the quantized layers' state buffers (replicated)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):  # a module left gathered (reshard_after_forward=false, after eval)
            module.reshard()
    total = 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    for layer in quantized_layers(model):
        total += sum(b.numel() * b.element_size() for name, b in layer.named_buffers(recurse=False)
                     if b is not None and name in layer._state_names)
    from qlora.nn.experts import quantized_stacks

    for _, module, attr in quantized_stacks(model):  # 4-bit expert stacks: their scales, replicated
        total += sum(b.numel() * b.element_size() for name, b in module.named_buffers(recurse=False)
                     if b is not None and name.startswith(attr + "_"))
    return total


def _mixed_precision_policy(mixed_precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # Master LoRA weights stay fp32 in the shards; the all-gathered copy used for compute is bf16/fp16;
    # gradients are reduced in fp32 so that summing over ranks adds no rounding beyond fp32's.
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)


def _mesh(world: World, hybrid: bool, device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    if not hybrid:
        return init_device_mesh(device_type, (world.size,), mesh_dim_names=("shard",))
    if world.size % world.local_size:
        raise ValueError(f"distributed.hybrid_shard=true needs the same number of processes on every node; "
                         f"{world.size} processes with {world.local_size} per node do not divide")
    # Shard within a node (fast links), replicate across nodes: HSDP.
    return init_device_mesh(device_type, (world.size // world.local_size, world.local_size),
                            mesh_dim_names=("replicate", "shard"))


def shard_fsdp2(model: nn.Module, world: World, options, mixed_precision: str, device: torch.device) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from qlora.train.offload import decoder_layers

    hold_packed_as_bytes(model)
    mesh = _mesh(world, options.hybrid_shard, device.type)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if options.cpu_offload else OffloadPolicy()
    common = dict(mesh=mesh, mp_policy=_mixed_precision_policy(mixed_precision), offload_policy=offload)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=options.reshard_after_forward, **common)
    # The root group is the transformers model under the PEFT wrapper, not the wrapper: generate()
    # calls the transformers model's forward directly, and FSDP2 gathers a group in its own forward.
    # It holds the embeddings and head (4.2 GB in bf16 for a 128k vocabulary at hidden 8192) and
    # follows the same option: resharded after the forward, gathered again for the backward.
    from qlora.lora import base_model

    fully_shard(base_model(model), reshard_after_forward=options.reshard_after_forward, **common)
    log.info("fsdp2: %d decoder layers + root sharded over %s; %.1f MiB of base per rank", len(layers),
             dict(zip(mesh.mesh_dim_names, mesh.shape)), base_bytes_per_rank(model) / 2**20)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP: the base is replicated (frozen, never reduced); only the LoRA gradients are all-reduced."""
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def wrap(model: nn.Module, world: World, options, mixed_precision: str, device: torch.device) -> nn.Module:
    """The model as `distributed.strategy` runs it (unchanged for none)."""
    if world.strategy == "ddp":
        return wrap_ddp(model, device)
    if world.strategy == "fsdp2":
        return shard_fsdp2(model, world, options, mixed_precision, device)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The PEFT model under DDP (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def full_trainable_state(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """name -> full (unsharded) tensor of each trainable parameter, on CPU; every rank must call it
    (FSDP2 gathers the shards), rank 0 uses it."""
    state = {}
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        with world.guard("gathering the adapter weights"):
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name] = tensor.detach().cpu()
    return state
