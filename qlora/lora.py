"""LoRA adapters on quantized layers (QuantizedLinear: Linear4bit and every registered format),
through PEFT's own extension point.

PEFT dispatches the layers it does not know to the classes a LoraConfig registers with
`_register_custom_module` (its documented "dynamic dispatch", an isinstance match). Registering
{QuantizedLinear: LoraQuantizedLinear} is all it takes: nothing in PEFT or transformers is patched, and the
adapters are plain PEFT adapters (same parameter names, same adapter_config.json), so they load
onto a dense or a bitsandbytes base with stock `PeftModel.from_pretrained`.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from qlora.models.families import vision_modules
from qlora.nn import QuantizedLinear

# init_lora_weights values that only touch lora_A / lora_B. The others (pissa, olora, corda, loftq,
# orthogonal, mica, lora_ga, eva) read or rewrite the dense base weight, which is packed here.
_SUPPORTED_INITS = (True, False, "gaussian")
# Keyword arguments PEFT's LoRA layers accept for variants (aLoRA offsets); the base layer must not see them.
_VARIANT_KWARGS = ("alora_offsets",)
_MERGE_ERROR = (
    "merging a LoRA adapter into a 4-bit or other quantized weight is not supported: re-quantizing W + BA would "
    "add a second rounding error. Keep the adapter separate (model.save_pretrained saves only the adapter), "
    "or use qlora's export, which merges in fp32 into a dense copy of the model."
)


class _DoraQuantizedLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude vector, with the base weight taken from QuantizedLinear.dequantize().

    PEFT's DoRA reads the weight through `dequantize_module_weight`, which only knows
    bitsandbytes' Params4bit and would take our packed bytes for the weight itself.
    """

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        with torch.no_grad():
            weight = base_layer.dequantize(torch.float32).to(lora_A.device)
            lora_weight = lora_B.float() @ lora_A.float()
            norm = self.get_weight_norm(weight, lora_weight, scaling)
        self.weight = nn.Parameter(norm.to(lora_A.dtype), requires_grad=True)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        # The same formula as PEFT's DoraLinearLayer.forward (DoRA paper, section 4.3: the norm is detached).
        lora_weight = self.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name).to(x.dtype)
        weight = base_layer.dequantize(x.dtype)
        weight_norm = self.get_weight_norm(weight, lora_weight.detach(), scaling, adapter_name=adapter_name).detach()
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:  # dropout is active: the base output must be recomputed on the dropped x
            base_result = F.linear(x, weight)
        elif base_layer.bias is not None:
            base_result = base_result - base_layer.bias.to(base_result.dtype)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


class _DoraQuantizedVariant(DoraLinearVariant):
    """DoraLinearVariant (forward reused as is) that builds the 4-bit-aware magnitude layer."""

    @staticmethod
    def init(module: "LoraQuantizedLinear", adapter_name: str, **kwargs: Any) -> None:
        if "lora_magnitude_vector" not in module.adapter_layer_names:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        dora = _DoraQuantizedLayer(fan_in_fan_out=False)
        dora.update_layer(base_layer=module.get_base_layer(), lora_A=module.lora_A[adapter_name].weight,
                          lora_B=module.lora_B[adapter_name].weight, scaling=module.scaling[adapter_name])
        module.lora_magnitude_vector[adapter_name] = dora


class LoraQuantizedLinear(nn.Module, LoraLayer):
    """LoRA (and DoRA) around a frozen QuantizedLinear: y = base(x) + B(A(dropout(x))) * scaling."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False  # a QuantizedLinear stores [out, in] like nn.Linear
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                          target_name=kwargs.get("target_name", ""))

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup only knows nn.Linear and the quantizers it ships with.
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): _DoraQuantizedVariant}

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as err:
            raise NotImplementedError(
                f"qlora's LoraQuantizedLinear supports plain LoRA and DoRA (use_dora=True) only; PEFT reports: {err}. "
                "Unset the other LoRA variant options (alora_invocation_tokens, arrow_config, velora_config, ...)."
            ) from err

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        init = config.init_lora_weights
        if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
            raise NotImplementedError(
                f"init_lora_weights={init!r} is not supported on quantized layers (it reads or rewrites the dense "
                f"base weight); use one of {list(_SUPPORTED_INITS)}"
            )
        if config.fan_in_fan_out:
            raise ValueError("fan_in_fan_out=True does not apply to a QuantizedLinear, whose weight is [out, in]; "
                             "leave fan_in_fan_out=False")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # A base still on meta (distributed.low_memory_load fills it after FSDP2 has sharded it): PEFT
        # would move the freshly initialised adapter to meta as well and lose its values. They are kept
        # here, after the same dtype cast, until qlora.distributed.low_memory copies them into the shards.
        weight = getattr(self.get_base_layer(), "weight", None)
        if device is None and weight is not None and weight.is_meta:
            super()._move_adapter_to_device_of_base_layer(adapter_name, device=torch.device("cpu"))
            pending = self.__dict__.setdefault("pending_adapter_values", {})
            pending.update({name: p.detach().clone() for name, p in self.named_parameters() if not p.is_meta})
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)

    # ---- merging ------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(_MERGE_ERROR)

    def unmerge(self) -> None:
        # Nothing can ever be merged (merge() refuses), so there is nothing to undo. This is a no-op
        # rather than an error because PeftModel.unmerge_adapter() calls it on every layer.
        if self.merged:  # cannot happen unless someone filled merged_adapters by hand
            raise NotImplementedError(_MERGE_ERROR)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A as a dense [out, in] tensor in the adapter's dtype (fp32 math on CPU half)."""
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_b.dtype
        if weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_a, weight_b = weight_a.float(), weight_b.float()  # CPU half matmuls are slow
        return ((weight_b @ weight_a) * self.scaling[adapter]).to(dtype)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        variant_kwargs = {k: kwargs.pop(k, None) for k in _VARIANT_KWARGS}
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:  # PEFT's mixed batch: one adapter (or "__base__") per row
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **variant_kwargs, **kwargs)

        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            # The adapter runs in its own dtype (fp32 after get_peft_model's autocast), the sum is cast back.
            x_lora = self._cast_input_dtype(x, lora_A.weight.dtype)
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, active_adapter=name, x=x_lora, result=result,
                                                         **variant_kwargs, **kwargs)
            else:
                result = self._add_lora(result, lora_A(self.lora_dropout[name](x_lora)), lora_B, self.scaling[name])
        return result.to(result_dtype)

    @staticmethod
    def _add_lora(result: torch.Tensor, hidden: torch.Tensor, lora_B: nn.Module, scaling: float) -> torch.Tensor:
        """result + lora_B(hidden) * scaling. The scaling goes on B's [out, r] weight and the sum into
        one addmm, instead of two passes over the [tokens, out] product and their two backward passes
        (on the embedded model, a twentieth of a training step). Identical where the scaling is a power
        of two (the default alpha = 2r), one rounding apart elsewhere."""
        weight, bias = getattr(lora_B, "weight", None), getattr(lora_B, "bias", None)
        if (type(lora_B) is not nn.Linear or weight.dtype != hidden.dtype or result.dtype != hidden.dtype
                or result.shape[:-1] != hidden.shape[:-1]):
            return result + lora_B(hidden) * scaling  # PEFT's own form
        out = result.reshape(-1, result.shape[-1])
        summed = torch.addmm(out, hidden.reshape(-1, hidden.shape[-1]), (weight * scaling).t())
        if bias is not None:
            summed = summed + bias * scaling
        return summed.view(result.shape)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


LoraLinear4bit = LoraQuantizedLinear  # the earlier name


# ---- configuration ----------------------------------------------------------------------------

def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _linear_names(model: nn.Module) -> list[str]:
    """Full names of the QuantizedLinear and nn.Linear modules, the output head excluded.

    On a model that already carries adapters, the wrapped layer is listed under the wrapper's name
    and the adapters' own lora_A / lora_B linears are left out.
    """
    heads = _output_head_names(model)
    # A vision-language model's vision side (qlora.models.families) is left out: text-only fine-tuning
    # gives it no gradient, and it stays 16-bit.
    vision = tuple(f"{name}." for name in vision_modules(model))
    adapter_parts = {id(sub) for layer in model.modules() if isinstance(layer, LoraLayer)
                     for key in layer.adapter_layer_names if isinstance(getattr(layer, key, None), nn.Module)
                     for sub in getattr(layer, key).modules()}
    found = []
    for name, module in model.named_modules():
        name = name.removesuffix(".base_layer")
        # A router that subclasses nn.Linear (Llama-4's returns scores and logits, a tuple PEFT's LoRA layer
        # cannot add to) stays as it is, as it stays 16-bit (qlora.models.families).
        if (isinstance(module, (QuantizedLinear, nn.Linear)) and id(module) not in adapter_parts and name not in heads
                and not name.startswith(vision) and "router" not in type(module).__name__.lower()):
            found.append(name)
    return found


def resolve_target_modules(model: nn.Module, target_modules: str | list[str] = "all-linear") -> list[str] | str:
    """The module names LoraConfig.target_modules should get.

    "all-linear" -> the leaf names (["q_proj", "k_proj", ...]) of every QuantizedLinear and nn.Linear
    except the output head (PEFT's own "all-linear" does not see QuantizedLinear). A leaf name that
    would also match a module that is not a target (the head, a non-linear module) is replaced by
    the full names of its linear modules. A list is checked: every name must be a module name or a
    module name suffix in the model. Any other string passes through (PEFT reads it as a regex).
    """
    linears = _linear_names(model)
    all_names = [name for name, _ in model.named_modules()]
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            return target_modules
        if not linears:
            raise ValueError(f"{type(model).__name__} has no quantized or nn.Linear layer besides the output head; "
                             "there is nothing for target_modules='all-linear' to adapt")
        wanted, resolved = set(linears), []
        for leaf in dict.fromkeys(name.rsplit(".", 1)[-1] for name in linears):
            matches = [n for n in all_names if n == leaf or n.endswith("." + leaf)]
            if all(n in wanted for n in matches):
                resolved.append(leaf)
            else:
                resolved.extend(n for n in matches if n in wanted)
        return resolved
    names = list(target_modules)
    unknown = [t for t in names if not any(n == t or n.endswith("." + t) for n in all_names)]
    if unknown:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(f"target_modules {unknown} match no module of {type(model).__name__}; its linear layers "
                         f"are {leaves} (or pass target_modules='all-linear')")
    return names


def lora_config(model: Optional[nn.Module] = None, target_experts: bool = True, **kwargs: Any) -> LoraConfig:
    """A peft.LoraConfig with QuantizedLinear registered for LoraQuantizedLinear.

    kwargs are LoraConfig's. With `model`, target_modules (default "all-linear") is resolved
    against it first; without, target_modules must already be names PEFT understands.
    target_experts: on a mixture-of-experts model, also adapt every expert stack (PEFT's
    target_parameters; qlora.lora_experts). PEFT's wrapper of a 3-D parameter takes no dropout, so an
    adapter on experts is built with lora_dropout=0 (a warning says so when another value was asked).
    """
    kwargs.setdefault("task_type", "CAUSAL_LM")
    if model is not None:
        kwargs["target_modules"] = resolve_target_modules(model, kwargs.get("target_modules", "all-linear"))
        if target_experts and not kwargs.get("target_parameters"):
            from qlora.lora_experts import expert_target_parameters

            kwargs["target_parameters"] = expert_target_parameters(model) or None
        if kwargs.get("target_parameters") and kwargs.get("lora_dropout"):
            warnings.warn(f"lora_dropout={kwargs['lora_dropout']} -> 0: the adapter covers expert stacks, and PEFT's "
                          "wrapper of a 3-D parameter (ParamWrapper) has no dropout and refuses an adapter that asks for "
                          "it; set lora.dropout=0, or lora.target_experts=false to keep dropout on attention-only "
                          "and dense MLP adapters", stacklevel=2)
            kwargs["lora_dropout"] = 0.0
    elif kwargs.get("target_modules") == "all-linear":
        raise ValueError("target_modules='all-linear' needs the model to resolve it: call lora_config(model, ...)")
    config = LoraConfig(**kwargs)
    register(config, model)
    return config


make_lora_config = lora_config


def register(config: LoraConfig, model: Optional[nn.Module] = None) -> LoraConfig:
    """Register LoraQuantizedLinear for QuantizedLinear on a LoraConfig (PEFT's dynamic dispatch), and
    with `model`, qlora.lora_experts' ParamWrapper for its classes holding 4-bit expert stacks.

    The registration is not saved in adapter_config.json: a config read back from disk needs it
    again before it is applied to a 4-bit model (load_lora does this).
    """
    config._register_custom_module({QuantizedLinear: LoraQuantizedLinear})
    if model is not None:
        from qlora.lora_experts import register_experts

        register_experts(config, model)
    return config


# ---- model preparation --------------------------------------------------------------------------

@contextlib.contextmanager
def _peft_reading_deprecated_attributes() -> Iterator[None]:
    """PEFT 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
    FutureWarning on every run; the call is PEFT's, so there is nothing for a user to change. Only that
    warning, only around PEFT's own wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def attach_lora(model: nn.Module, *, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                target_modules: str | list[str] = "all-linear", use_rslora: bool = False, use_dora: bool = False,
                bias: str = "none", init_lora_weights: bool | str = True, gradient_checkpointing: bool = True,
                **extra_lora_kwargs: Any) -> PeftModel:
    """Freeze the 4-bit model, prepare it for training and wrap it with a new LoRA adapter."""
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing does not need inputs that require grad, but transformers'
        # own recipe and older code paths do; it is cheap (one hook on the embeddings).
        model.enable_input_require_grads()
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = lora_config(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=target_modules, use_rslora=use_rslora, use_dora=use_dora,
                         bias=bias, init_lora_weights=init_lora_weights, **extra_lora_kwargs)
    with _peft_reading_deprecated_attributes():
        peft_model = get_peft_model(model, config)
    if getattr(model, "hf_device_map", None):  # dispatched with offloaded modules (qlora.models.offload)
        from qlora.models.offload import place_offloaded_adapters

        place_offloaded_adapters(peft_model, init_lora_weights)
    return peft_model


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
              is_trainable: bool = False) -> PeftModel:
    """PeftModel.from_pretrained for a quantized model: the saved config, with QuantizedLinear registered."""
    config = register(LoraConfig.from_pretrained(str(adapter_dir)), model)
    with _peft_reading_deprecated_attributes():
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name,
                                         is_trainable=is_trainable, config=config)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under the DDP and PEFT wrappers (whose forward only delegates to it)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts.

    A QuantizedLinear weight counts as its logical out*in elements, not its packed bytes (two codes a
    byte, or fewer elements still with a wider quant_storage), so that the total matches the
    dense model's.
    """
    from qlora.nn.experts import held_experts, quantized_stacks

    logical = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear)}
    logical.update({id(m._parameters[p]): held_experts(m, p).shape.numel() for _, m, p in quantized_stacks(model)})
    trainable = total = 0
    for param in model.parameters():
        count = logical.get(id(param), param.numel())
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4g}"
    from qlora.lora_experts import adapted_experts

    on_experts, stacks = adapted_experts(model)
    if stacks:
        line += f" || on {stacks} expert stacks: {on_experts:,}, on linear layers: {trainable - on_experts:,}"
    return line
