"""Merging LoRA on mixture-of-experts stacks, and writing them back in the Hub's per-expert layout.

transformers 5 holds a layer's experts as fused 3-D stacks (`experts.gate_up_proj` [E, 2I, H]; gpt-oss
transposed, [E, H, 2I]) and PEFT adapts them with `ParamWrapper` (`LoraConfig.target_parameters`):
per stack, lora_A [r*E, in] and lora_B [out, r*E], so expert e's delta in the [out, in] orientation is

    delta_e = scaling * B[:, :, e] @ A[e]     with A = lora_A.reshape(E, r, in), B = lora_B.reshape(out, r, E)

(PEFT 0.21's ParamWrapper.get_delta_weight, whose einsum writes the same product in the stack's own layout).
Two wrappers on one module are nested (`experts.base_layer` holds the first targeted parameter), and
which parameter a saved key belongs to is PEFT's choice: `adapter_layout` asks PEFT itself, by
injecting the adapter's config into a meta copy of the model, so rank/alpha patterns, nesting order
and scaling are PEFT's code, not ours.

The merge is per expert: W_e = dequant(NF4(W_e)) (re-quantized exactly as the loader quantized it for
training: the same converter output, the same `set_expert`) in fp32, plus delta_e, cast once. The
merged stack of one layer is then written through transformers' `revert_weight_conversion`, the
function `save_pretrained` uses, so the output holds what a Hub checkpoint holds
(`experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`, ...). Memory: one
layer's merged stack in the output dtype, and one expert of it in 16 bits at a time where
qlora.models.conversion streams the converter per expert (else the layer's 16-bit stack, merged in place);
never the whole model.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from qlora.errors import DamagedFileError, OptionError
from qlora.models.checkpoint import ShardReader
from qlora.models.conversion import ConvertedTarget, load_converted
from qlora.nn.experts import expert_parameter_names, held_experts, is_experts_module, logical_shape


@dataclasses.dataclass
class ExpertAdapter:
    """One adapted expert stack: its model name and PEFT's factors and scaling for it."""

    stack: str                 # "model.layers.0.mlp.experts.gate_up_proj"
    module: str                # the PEFT module path its keys were saved under
    lora_a: torch.Tensor       # [r*E, in]
    lora_b: torch.Tensor       # [out, r*E]
    scaling: float
    expected_a: tuple[int, ...]  # the shapes PEFT gives the factors on this base
    expected_b: tuple[int, ...]

    def fits(self) -> bool:
        return tuple(self.lora_a.shape) == self.expected_a and tuple(self.lora_b.shape) == self.expected_b

    def delta(self, e: int, num_experts: int) -> torch.Tensor:
        """scaling * B_e A_e in fp32, [out, in] (the stack's logical orientation)."""
        a = self.lora_a.float().reshape(num_experts, -1, self.lora_a.shape[-1])[e]
        b = self.lora_b.float().reshape(self.lora_b.shape[0], -1, num_experts)[:, :, e]
        return (b @ a) * self.scaling


def expert_stack_names(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Full name of every 3-D expert stack of `model` -> (its experts module, the parameter name)."""
    from qlora.nn.bmm_experts import BMM_EXPERTS_CLASSES

    # A module of BMM_EXPERTS_CLASSES not swapped (base="original"): its [E, in, out] stack is what stock PEFT
    # reads as [E, out, in], the orientation of its adapter's delta, so it merges as an untransposed stack.
    return {f"{module_name}.{param}": (module, param) for module_name, module in model.named_modules()
            if is_experts_module(module) or type(module).__name__ in BMM_EXPERTS_CLASSES
            for param in expert_parameter_names(module)}


def adapter_layout(plain_skeleton: nn.Module, lora_config, modules: dict[str, dict]) -> dict[str, ExpertAdapter]:
    """Split the expert adapters out of `modules` (the adapter's tensors grouped by PEFT module path,
    as read_adapter returns them; they are removed from it) -> {stack name: ExpertAdapter} (the caller
    checks `fits()`).

    `plain_skeleton` is a meta model with dense 3-D stacks; PEFT injects the adapter's own config into
    a copy of it, which names the parameter and scaling of each ParamWrapper path.
    """
    if not getattr(lora_config, "target_parameters", None):
        return {}
    from peft import inject_adapter_in_model
    from peft.tuners.lora.layer import ParamWrapper

    config = copy.deepcopy(lora_config)
    config.inference_mode = True
    injected = inject_adapter_in_model(config, copy.deepcopy(plain_skeleton), low_cpu_mem_usage=True)
    adapters = {}
    for path, wrapper in injected.named_modules():
        if not isinstance(wrapper, ParamWrapper) or path not in modules:
            continue
        parts = modules.pop(path)
        module_path = path.replace(".base_layer", "")
        stack = f"{module_path}.{wrapper.parameter_name}"
        adapters[stack] = ExpertAdapter(stack, path, parts["A"], parts["B"], float(wrapper.scaling["default"]),
                                        tuple(wrapper.lora_A["default"].weight.shape),
                                        tuple(wrapper.lora_B["default"].weight.shape))
    return adapters


class ExpertStackSource:
    """The merged stacks of a 16-bit checkpoint, one converter target (one layer's projection) at a time:
    per-expert tensors through transformers' converter (expert by expert where qlora.models.conversion can
    run it so, as the loader does), already-fused ones by name."""

    def __init__(self, skeleton: nn.Module, reader: ShardReader, names: dict[str, str],
                 targets: dict[str, ConvertedTarget]):
        self.skeleton, self.reader, self.names, self.targets = skeleton, reader, names, targets
        # What a converter produced beside the stack asked for (a converter with several targets), until asked.
        self.pending: dict[str, torch.Tensor] = {}

    def merged(self, name: str, merge: Callable[[str, torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """The stack `name` merged: `merge(name, dense experts [n, ...], first expert)` returns them merged in
        the output dtype; they are written into one stack, so a layer is dense in 16 bits one expert at a
        time where the converter allows it (the merged stack, in the output dtype, is the one copy held)."""
        if name in self.pending:
            return self.pending.pop(name)
        if name not in self.targets:
            key = self.names.get(name)
            if key is None:
                raise DamagedFileError(f"the base checkpoint has no tensor for {name} (neither fused nor per expert); "
                                       "it is incomplete or belongs to another architecture")
            return merge(name, self.reader.get(key), 0)
        stacks: dict[str, torch.Tensor] = {}

        def place(target: str, tensor: torch.Tensor, first: Optional[int] = None) -> None:
            chunk = merge(target, tensor, first or 0)
            if first is None:
                stacks[target] = chunk
                return
            if target not in stacks:
                module_name, _, param = target.rpartition(".")
                experts = logical_shape(self.skeleton.get_submodule(module_name), param)[0]
                stacks[target] = torch.empty((experts, *chunk.shape[1:]), dtype=chunk.dtype)
            stacks[target][first:first + chunk.shape[0]].copy_(chunk)

        load_converted(self.skeleton, self.reader, self.targets[name], place)
        if name not in stacks:
            raise DamagedFileError(f"the checkpoint's converter for {name} did not produce it; the checkpoint "
                                   "does not match config.json")
        merged = stacks.pop(name)
        self.pending.update(stacks)
        return merged


def merged_stack(module: nn.Module, param: str, dense: torch.Tensor, adapter: Optional[ExpertAdapter],
                 quantized: bool, out_dtype: Optional[torch.dtype], first: int = 0) -> torch.Tensor:
    """Experts first, first+1, ... of a stack (`dense` [n, ...] in the module's layout) merged, in `out_dtype`
    (None: the checkpoint's): per expert, dequant(quant(W_e)) (when training held it in 4 bits) + delta_e in
    fp32, rounded once.

    `dense` (the converter's output, owned here) is overwritten expert by expert when the output dtype is
    its own (bf16 into bf16: no second copy of a whole stack, 0.75 GB for a Qwen3-30B-A3B gate_up)."""
    transposed = bool(getattr(module, "is_transposed", False))
    template = held_experts(module, param) if quantized else None
    num_experts = logical_shape(module, param)[0]
    out_dtype = out_dtype or dense.dtype
    merged = dense if out_dtype == dense.dtype else torch.empty(dense.shape, dtype=out_dtype)
    for i in range(dense.shape[0]):
        matrix = dense[i].t() if transposed else dense[i]  # [out, in]
        if template is not None:
            matrix = _requantized(template, matrix)
        matrix = matrix.float()  # aliases dense[i] only when it is fp32 and nothing below changes it
        if adapter is not None:
            delta = adapter.delta(first + i, num_experts)
            if getattr(module, "peft_reads_as_out_in", False):  # PEFT's B A is on W^T there (qlora.nn.bmm_experts)
                delta = delta.t()
            if tuple(delta.shape) != tuple(matrix.shape):
                raise ValueError(f"{adapter.stack}: the adapter's expert delta is {list(delta.shape)}, the base's "
                                 f"expert is {list(matrix.shape)}; pass the run's own base checkpoint")
            matrix = matrix + delta
        merged[i].copy_(matrix.t() if transposed else matrix)
    return merged


def _requantized(template, matrix: torch.Tensor) -> torch.Tensor:
    """dequant(quant(matrix)) in fp32, with the stack's format and settings: the bytes set_expert wrote
    while loading for training (one expert, the checkpoint's own dtype in)."""
    single = type(template).placeholder(1, matrix.shape[0], matrix.shape[1], "cpu", template.dtype,
                                        quant_type=template.quant_type, blocksize=template.blocksize,
                                        double_quant=template.double_quant, segments=template.segments)
    single.set_expert(0, matrix)
    return single.dequantize_expert(0, torch.float32)


def hub_layout(skeleton: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` (model names) under the names save_pretrained writes (transformers' reverse conversion:
    fused stacks split per expert, renamed keys such as Mixtral's block_sparse_moe)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 has no conversion mapping: model names are checkpoint names
        yield from tensors.items()
        return
    yield from revert_weight_conversion(skeleton, dict(tensors)).items()


def refuse_prequantized_experts(skeleton: nn.Module, base: str) -> None:
    if any(is_experts_module(m) for m in skeleton.modules()):
        raise ValueError(f"the base {base} is a mixture-of-experts checkpoint that is already quantized; the merge "
                         "reads a 16-bit base: export against the 16-bit checkpoint it was quantized from")


# config.json keys holding a mixture-of-experts model's expert count (transformers' families).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def refuse_requantized_experts(source, format: str) -> None:  # noqa: A002 (the export option's name)
    """format=int8 writes an LLM.int8 checkpoint, a format with no expert stacks (qlora.quant.experts says
    why): refused before anything is merged. format=nf4 re-quantizes the experts like any weight."""
    from transformers import AutoConfig

    from qlora.models.checkpoint import resolve_checkpoint

    if format != "int8":
        return
    config = AutoConfig.from_pretrained(resolve_checkpoint(source.base, source.revision),
                                        trust_remote_code=source.trust_remote_code)
    if any(getattr(config, k, None) for k in EXPERT_COUNT_KEYS):
        raise OptionError(
            f"format={format} on the mixture-of-experts model {source.base} ({config.model_type}): LLM.int8 has no "
            "form for expert stacks; export format=nf4, format=hf or format=gguf")


__all__ = ["ExpertAdapter", "ExpertStackSource", "adapter_layout", "expert_stack_names", "hub_layout", "merged_stack",
           "refuse_prequantized_experts", "refuse_requantized_experts"]
