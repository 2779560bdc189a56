"""distributed.low_memory_load: FSDP2 ranks receive only their shards of the base, read once by rank 0.

A normal load makes every rank read the whole checkpoint and quantize every layer before
`fully_shard` keeps its shard: for a 70B, N processes on one host each hold a 35 GB 4-bit copy at
the peak (Llama-3 70B's largest tensor, the 2.1 GB bf16 embedding, is the streaming one here).
Here every rank builds the model on the meta device (no bytes: `qlora.load_model(device="meta")`),
attaches LoRA (the adapter's initial values are kept aside, see LoraQuantizedLinear) and is sharded
by `fully_shard` while still meta. Then each rank allocates only its shards (`to_empty`) and, tensor
by tensor in the model's order, rank 0 reads one checkpoint tensor, quantizes it on its device and
scatters the dim-0 row blocks FSDP2 assigned to each rank (`torch.chunk` rows: ceil(rows / N) per
rank, the last ones short or empty); the quant state (scales, code tables: replicated buffers, 3% of
the packed bytes for NF4 + double quant) is broadcast. Host memory per rank: its shards plus one
streaming tensor (rank 0: one dense tensor and its quantized form). The bytes each rank ends with
are the ones a normal load followed by `fully_shard` gives it, bit for bit: the same reader, the
same quantizer, the same row split.

Mixture-of-experts stacks go through transformers' checkpoint conversion as in the single-process
loader (qlora.models.conversion), one expert at a time where the checkpoint holds per-expert
tensors: rank 0 quantizes them into its copy of that one stack (one layer's projection in 4 bits,
plus one expert in 16 bits), then scatters whole experts (rows of the packed [E, bytes] stack) and
broadcasts the scales.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from qlora.distributed.world import World, _collective_device
from qlora.errors import DamagedFileError
from qlora.memory import release_freed_memory
from qlora.models.conversion import check_expert_sources, load_converted
from qlora.nn.experts import held_experts, held_state, logical_shape, quantize_into, quantized_stacks
from qlora.nn.quantized import QuantizedLinear

log = logging.getLogger("qlora.distributed")


def load_into_shards(model: nn.Module, world: World, device: torch.device, params_device: torch.device) -> None:
    """Fill a meta skeleton that fully_shard has sharded: allocate this rank's shards on
    `params_device` (the host with cpu_offload), then stream the checkpoint from rank 0."""
    from qlora.lora import base_model

    hf_model = base_model(model)
    source = hf_model.__dict__.pop("qlora_unloaded")
    kept = {name: b for name, b in model.named_buffers() if b is not None and not b.is_meta}
    model.to_empty(device=params_device)
    for name, buffer in kept.items():  # rotary tables and other buffers the skeleton built for real
        _set_buffer(model, name, buffer.to(device))
    for module in model.modules():  # LoRA's initial values, kept when PEFT met the meta base
        for name, full in module.__dict__.pop("pending_adapter_values", {}).items():
            _copy_rows(module.get_parameter(name), full)
    with world.guard("receiving the base's shards from rank 0"):
        _Streamer(hf_model, source, world, device).run()
    log.info("low_memory_load: %d quantized layers streamed from rank 0", len(source.targets))


class _Streamer:
    """Rank 0 reads, quantizes and sends; every rank walks the same tensors in the same order."""

    def __init__(self, model: nn.Module, source, world: World, device: torch.device):
        self.model, self.source, self.world, self.device = model, source, world, device
        # Module names as on the plain skeleton (PEFT has since wrapped each target as <name>.base_layer).
        modules = [(n.replace(".base_layer", ""), m) for n, m in model.named_modules()]
        targets = set(source.targets)
        self.layers = [(n, m) for n, m in modules if n in targets and isinstance(m, QuantizedLinear)]
        # 4-bit expert stacks (their packed Parameter sharded along the experts) and the tensors transformers'
        # conversion mapping builds from per-expert checkpoint tensors: streamed one target at a time.
        self.plain = dict(modules)  # the innermost module under each plain name (a wrapper's base layer)
        self.stacks = {f"{n.replace('.base_layer', '')}.{a}": (m, a) for n, m, a in quantized_stacks(model)}
        self.converted = getattr(source, "converted", {})
        streamed = set(self.stacks) | set(self.converted)
        # Dense parameters by module (PEFT and FSDP2 replace Parameter objects, not modules): every
        # parameter outside the quantized layers' packed data, LoRA excluded (it is not in the checkpoint).
        self.dense = [(n, m, a) for n, m in modules for a, p in m.named_parameters(recurse=False)
                      if not (n in targets and a == "weight") and ".lora_" not in f".{n}."
                      and f"{n}.{a}" not in streamed]
        self.reader = None

    def run(self) -> None:
        from qlora.models.checkpoint import ShardReader

        problem = None
        if self.world.is_main:
            self.reader = ShardReader(self.source.directory)
            problem = self._check()
        problem = self.world.broadcast(problem)
        try:
            if problem:
                raise DamagedFileError(f"model.name_or_path={self.source.directory}: {problem}")
            for name, layer in self.layers:
                self._layer(name, layer)
                release_freed_memory()
            for name in [*self.converted, *(n for n in self.stacks if n not in self.converted)]:
                self._converted_or_stack(name)
                release_freed_memory()
            seen: set[int] = set()
            for name, module, attr in self.dense:
                param = module._parameters[attr]
                if id(param) in seen:  # a tied weight, filled once
                    continue
                seen.add(id(param))
                full = None
                if self.world.is_main:
                    full = self.reader.get(self._dense_key(name, attr)).to(self.device, param.dtype)
                _scatter_rows(param, full, self.world)
                del full
                release_freed_memory()
        finally:
            if self.reader is not None:
                self.reader.close()

    def _dense_key(self, module_name: str, attr: str) -> Optional[str]:
        return self.source.names.get(f"{module_name}.{attr}")

    def _check(self) -> Optional[str]:
        """The first checkpoint tensor that is missing or of the wrong shape, as one message (rank 0):
        every rank raises it, rather than rank 0 failing midway while the others wait."""
        from qlora.models.conv1d import checkpoint_shape
        from qlora.models.loading import layer_checkpoint_prefix

        wanted = []
        for name, layer in self.layers:
            if self.source.prequantized:
                data_key = type(layer.quantized_weight).data_key
                if layer_checkpoint_prefix(self.reader, self.source.names, name, data_key) is None:
                    return (f"the checkpoint has no tensor for {name}.{data_key}; it is incomplete or belongs to "
                            "another architecture")
            else:
                wanted.append((f"{name}.weight", self.source.names.get(f"{name}.weight"), checkpoint_shape(layer)))
        for target in self.converted.values():  # each expert present, all of one shape (one line naming it)
            try:
                check_expert_sources(_PlainNames(self.model, self.plain), self.reader, target)
            except ValueError as err:
                return str(err)
        for name, (module, attr) in self.stacks.items():
            if name not in self.converted:  # a fused stack, as the module holds it (gpt-oss, Llama-4)
                e, out_features, in_features = logical_shape(module, attr)
                layout = (e, in_features, out_features) if module.is_transposed else (e, out_features, in_features)
                wanted.append((name, self.source.names.get(name), layout))
        seen: set[int] = set()
        for name, module, attr in self.dense:
            param = module._parameters[attr]
            if id(param) not in seen:  # a tied head is the embedding's tensor: the checkpoint holds it once
                seen.add(id(param))
                wanted.append((f"{name}.{attr}", self._dense_key(name, attr), tuple(param.shape)))
        for name, key, expected in wanted:
            if key is None or key not in self.reader:
                return f"the checkpoint has no tensor for {name}; it is incomplete or belongs to another architecture"
            if self.reader.shape(key) != expected:
                return (f"{key}: checkpoint tensor has shape {list(self.reader.shape(key))}, the model built from "
                        f"config.json expects {list(expected)}; the config and the weights do not match")
        return None

    def _layer(self, name: str, layer: QuantizedLinear) -> None:
        """One quantized layer: its packed rows scattered, its state broadcast, its template shared."""
        weight = None
        if self.world.is_main:
            weight = self._read_quantized(name, layer)
        # The format's fields that are not tensors (shape, blocksize, quant type) and the state's
        # shapes and dtypes: rank 0's weight with every tensor on meta.
        template = self.world.broadcast(None if weight is None else weight.replace(
            **{k: None if t is None else t.to("meta") for k, t in weight.tensors().items()}))
        state = template.tensors()
        data = state.pop(template.data_name)
        if set(state) != set(layer._state_names):
            raise ValueError(f"{name}: the checkpoint's quant state {sorted(state)} does not match the layer's "
                             f"{sorted(layer._state_names)}")
        full = None
        if weight is not None:
            full = weight.data.contiguous().reshape(-1)
            full = (full.view(torch.uint8) if layer.weight.dtype == torch.uint8 else full).reshape(layer.weight.shape)
        elif data.numel() * data.element_size() != layer.weight.numel() * layer.weight.element_size():
            raise ValueError(f"{name}: the checkpoint's packed weight has {data.numel() * data.element_size()} bytes, "
                             f"the layer {layer.weight.numel() * layer.weight.element_size()}")
        _scatter_rows(layer.weight, full, self.world)
        for key, meta in state.items():
            if meta is None:
                layer._buffers[key] = None
                continue
            tensor = weight.tensors()[key] if weight is not None else torch.empty_like(meta, device=self.device)
            _broadcast(tensor, self.world)
            layer._buffers[key] = tensor
        layer._template = template

    def _converted_or_stack(self, name: str) -> None:
        """One expert stack (rank 0 quantizes it one expert at a time, through transformers' conversion
        where the checkpoint holds per-expert tensors; every rank receives its whole experts and the
        replicated scales) or one other tensor the conversion builds (scattered like any dense one)."""
        module_name, _, attr = name.rpartition(".")
        module = self.plain[module_name]
        held = held_experts(module, attr)
        whole = None  # rank 0: the whole stack, quantized (or the whole dense tensor)
        if self.world.is_main:
            if held is not None:
                whole = type(held).placeholder(*held.shape, device=self.device, compute_dtype=held.dtype,
                                               quant_type=held.quant_type, blocksize=held.blocksize,
                                               double_quant=held.double_quant, quant_storage=held.packed.dtype,
                                               segments=held.segments)
            whole = self._read_converted(name, module, attr, whole)
        if held is None:
            _scatter_rows(module._parameters[attr], whole, self.world)
            return
        _scatter_rows(module._parameters[attr], None if whole is None else whole.packed, self.world)
        for field, buffer in held_state(module, attr).items():  # the stack's state, as uint8 buffers: replicated
            if whole is not None:
                buffer.copy_(getattr(whole, field).contiguous().reshape(-1).view(torch.uint8))
            _broadcast(buffer, self.world)

    def _read_converted(self, name: str, module: nn.Module, attr: str, stack):
        """Rank 0: `name` read and converted; into `stack` (quantized, one expert at a time) when it is one."""
        target = self.converted.get(name)
        if target is None:  # a fused stack under its own name
            quantize_into(stack, module.is_transposed, name, self.reader.get(self.source.names[name]).to(self.device))
            return stack
        dense = {}

        def place(placed: str, tensor: torch.Tensor, first=None) -> None:
            if placed != name:
                raise NotImplementedError(f"{target.sources[0][1]}: its conversion also builds {placed}, which "
                                          "low_memory_load does not stream; set distributed.low_memory_load=false")
            if stack is not None:
                quantize_into(stack, module.is_transposed, name, tensor.to(self.device), first)
            else:
                dense[name] = tensor.to(self.device, module._parameters[attr].dtype)

        load_converted(_PlainNames(self.model, self.plain), self.reader, target, place)
        return stack if stack is not None else dense[name]

    def _read_quantized(self, name: str, layer: QuantizedLinear):
        from qlora.models.conv1d import as_out_in
        from qlora.models.loading import layer_checkpoint_tensors

        weight_cls = type(layer.quantized_weight)
        if self.source.prequantized:
            prefix, pieces = layer_checkpoint_tensors(self.reader, self.source.names, name, weight_cls.data_key)
            return weight_cls.from_checkpoint(pieces, device=self.device, where=prefix + weight_cls.data_key,
                                              **self.source.checkpoint_options)
        dense = as_out_in(layer, self.reader.get(self.source.names[f"{name}.weight"])).to(self.device)
        return weight_cls.quantize(dense, **layer.current_options())


class _PlainNames:
    """The model as qlora.models.conversion reads it, under the plain skeleton's names: PEFT has since
    wrapped adapted modules (`experts` -> `experts.base_layer`), the converters look them up by their
    own names."""

    def __init__(self, model: nn.Module, plain: dict[str, nn.Module]):
        self.config, self._plain = model.config, plain

    def get_submodule(self, name: str) -> nn.Module:
        if name not in self._plain:
            raise AttributeError(name)
        return self._plain[name]

    def get_parameter(self, name: str) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        return getattr(self.get_submodule(module_name), attr)


def _set_buffer(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._buffers[attr] = tensor


def _row_split(param) -> tuple[int, dict[int, int]]:
    """(rows per shard, {global rank: its shard index}) of a Shard(0) DTensor; (rows, {}) when the
    parameter is whole on every rank."""
    from torch.distributed.tensor import DTensor, Shard

    rows = param.shape[0] if param.dim() else 1
    if not isinstance(param, DTensor):
        return rows, {}
    mesh = param.device_mesh
    dims = [i for i, p in enumerate(param.placements) if isinstance(p, Shard)]
    if not dims:
        return rows, {}
    if len(dims) != 1 or param.placements[dims[0]].dim != 0:
        raise NotImplementedError(f"low_memory_load supports parameters sharded on dim 0 only, got {param.placements}")
    axis = dims[0]
    ranks = mesh.mesh  # [shard] or [replicate, shard]: the global rank at each mesh coordinate
    index = {int(ranks[c]): c[axis] for c in itertools.product(*(range(n) for n in ranks.shape))}
    return math.ceil(rows / ranks.shape[axis]), index


def _local(param) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param.data


def _copy_rows(param, full: torch.Tensor) -> None:
    """Copy this rank's rows of `full` (a tensor every rank holds) into `param`'s shard."""
    size, index = _row_split(param)
    local = _local(param)
    start = index.get(dist.get_rank(), 0) * size if index else 0
    with torch.no_grad():
        local.copy_(full[start:start + local.shape[0]] if index else full)


def _broadcast(tensor: torch.Tensor, world: World) -> None:
    device = _collective_device()
    wire = tensor if tensor.device == device else tensor.to(device)
    dist.broadcast(wire, src=0)
    if wire is not tensor:
        tensor.copy_(wire)


def _scatter_rows(param, full: Optional[torch.Tensor], world: World) -> None:
    """Rank 0's `full` tensor into every rank's shard of `param`: each rank receives its own rows
    (ceil(rows / shards) of them, zero-padded at the end); a replicated parameter is broadcast."""
    local = _local(param)
    size, index = _row_split(param)
    if not index:
        if world.is_main:
            with torch.no_grad():
                local.copy_(full)
        _broadcast(local, world)
        return
    device = _collective_device()
    shape = (size, *local.shape[1:])
    chunks = None
    if world.is_main:
        chunks = []
        for rank in range(world.size):
            piece = full[index[rank] * size:(index[rank] + 1) * size]
            if piece.shape[0] < size or piece.device != device:
                padded = torch.zeros(shape, dtype=full.dtype, device=device)
                padded[:piece.shape[0]] = piece
                piece = padded
            chunks.append(piece.contiguous())
    direct = local.shape[0] == size and local.is_contiguous() and local.device == device
    received = local if direct else torch.empty(shape, dtype=local.dtype, device=device)
    dist.scatter(received, chunks, src=0)
    if not direct:
        with torch.no_grad():
            local.copy_(received[:local.shape[0]])
