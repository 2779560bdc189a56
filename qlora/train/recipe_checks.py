"""Recipe checks: ranges and choices (`validate`, run before anything loads), and what Hydra's
structured config cannot check: keys added with `+`, and `_target_` nodes.

Hydra refuses an unknown key given plainly (`trainer.max_step=10`), but `+trainer.max_step=10`, as
Hydra's own hint suggests, adds it even to a structured node, and the run then ignores it. The
optimizer, scheduler and data format are `_target_` nodes typed `Any`, so nothing checks their
keys or values at all: `optimizer.lr=abc` failed only after the model had loaded. Both are checked
here, before anything loads, and every failure names the full dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig

from qlora.kernels.nf4.format import check_blocksize
from qlora.options import device_problem
from qlora.train.objective_checks import check_objective
from qlora.train.schema import ConfigError, RunConfig

# Hydra's own keys on a _target_ node; never passed to the target.
_HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
# Arguments the trainer passes itself, so a recipe must not set them.
_PASSED_BY_TRAINER = {"optimizer": {"params"}, "scheduler": {"optimizer", "num_training_steps"}, "data.format": set()}


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean {match[0]}?" if match else f"valid keys: {', '.join(sorted(valid))}"


def check_unknown_keys(cfg: DictConfig) -> None:
    """Every key of a schema-typed node must be a field of its dataclass, `+`-added ones included."""
    _check_node(cfg, RunConfig, "")


def _check_node(node: DictConfig, schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{name}" for name in fields]
            raise ConfigError(f"unknown recipe key {dotted} (a key added with + must exist too); "
                              f"{_closest(dotted, valid)}")
        nested = _dataclass_of(schema, key)
        child = node[key]
        if nested is not None and isinstance(child, DictConfig):
            _check_node(child, nested, f"{dotted}.")


def _dataclass_of(schema: type, key: str):
    hints = inspect.get_annotations(schema, eval_str=True)
    hint = hints.get(key)
    return hint if dataclasses.is_dataclass(hint) else None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, key: str, value: Any, rule: str, example: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {rule}; e.g. {key}={example}")


# key -> (test, rule, example): the optimizer and scheduler arguments every recipe uses.
_VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "optimizer.lr": (lambda v: _number(v) and math.isfinite(v) and v > 0, "a finite number > 0", "2e-4"),
    "optimizer.eps": (lambda v: _number(v) and math.isfinite(v) and v > 0, "a finite number > 0", "1e-8"),
    "optimizer.weight_decay": (lambda v: _number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0", "0.0"),
    "optimizer.betas": (lambda v: isinstance(v, (list, tuple, ListConfig)) and len(v) == 2
                        and all(_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)", "[0.9,0.999]"),
    "optimizer.page_size_mb": (lambda v: _number(v) and math.isfinite(v) and v > 0, "a number > 0", "64"),
    "optimizer.min_8bit_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                "an integer >= 0", "4096"),
    "optimizer.paged": (lambda v: isinstance(v, bool), "true or false", "true"),
    "scheduler.num_warmup_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                   "an integer >= 0", "10"),
}


def check_targets(cfg: DictConfig) -> None:
    """The `_target_` nodes: importable, no key their target does not take, values in range."""
    for node_key in ("optimizer", "scheduler", "data.format"):
        _check_target_keys(node_key, _select(cfg, node_key))
    for dotted, (test, rule, example) in _VALUE_RULES.items():
        group, _, key = dotted.partition(".")
        node = cfg[group]
        if key in node:
            _require(test(node[key]), dotted, node[key], rule, example)
    if cfg.scheduler.get("_target_") == "transformers.get_scheduler" and "name" in cfg.scheduler:
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        _require(cfg.scheduler.name in names, "scheduler.name", cfg.scheduler.name, f"one of {', '.join(names)}",
                 "cosine")


def _select(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def import_target(dotted: str):
    """The object a `_target_` names: the longest importable module prefix, then attributes."""
    parts = str(dotted).split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def _check_target_keys(node_key: str, node: DictConfig) -> None:
    target = node["_target_"]
    try:
        obj = import_target(target)
    except Exception as err:  # ImportError, AttributeError, ...: all mean "not importable"
        raise ConfigError(f"{node_key}._target_={target!r} cannot be imported ({type(err).__name__}: {err}); "
                          "name an importable class or function, e.g. qlora.optim.PagedAdamW") from None
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check against
    parameters = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # takes any keyword
    accepted = [name for name in parameters if name != "self"]
    for key in node.keys():
        if key in _HYDRA_KEYS:
            continue
        if key in _PASSED_BY_TRAINER[node_key]:
            raise ConfigError(f"{node_key}.{key} is passed by the trainer itself; remove it from the recipe")
        if key not in accepted:
            valid = [f"{node_key}.{name}" for name in accepted if name not in _PASSED_BY_TRAINER[node_key]]
            raise ConfigError(f"unknown recipe key {node_key}.{key}: {target} takes no argument {key!r}; "
                              f"{_closest(f'{node_key}.{key}', valid)}")


# ---- ranges and choices: `validate` runs every check ------------------------------------------
_CHOICES = {
    "quantization.quant_type": ("nf4", "fp4", "int8", "none"),
    "quantization.method": ("bitsandbytes", "gptq"),
    "quantization.compute_dtype": ("bfloat16", "float16", "float32", "auto"),
    "quantization.quant_storage": ("uint8", "bfloat16", "float16", "float32"),
    "lora.bias": ("none", "all", "lora_only"),
    "lora.init": ("default", "loftq"),
    "trainer.mixed_precision": ("no", "bf16", "fp16"),
    "logger.backend": ("jsonl", "wandb"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "distributed.strategy": ("none", "ddp", "fsdp2"),
}
_POSITIVE = ("lora.r", "data.max_seq_len", "trainer.max_steps", "trainer.micro_batch_size",
             "trainer.gradient_accumulation_steps", "trainer.keep_last", "trainer.max_new_tokens",
             "trainer.generation_batch_size",
             "trainer.log_every")
_NON_NEGATIVE = ("lora.dropout", "trainer.max_grad_norm", "trainer.eval_every", "trainer.save_every",
                 "trainer.eval_batches", "trainer.eval_samples", "trainer.exact_match_examples",
                 "quantization.threshold")


def validate(cfg: DictConfig) -> None:
    """Range and choice checks; raises ConfigError naming the key, the value and the fix."""
    check_unknown_keys(cfg)
    for key, choices in _CHOICES.items():
        value = _select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}; set {key}=<one of them>")
    for key in _POSITIVE:
        if _select(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {_select(cfg, key)}")
    for key in _NON_NEGATIVE:
        if _select(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_select(cfg, key)}")
    try:
        check_blocksize(cfg.quantization.blocksize)
    except ValueError as err:
        raise ConfigError(f"quantization.{err}") from None
    if cfg.model.get("dtype") not in (None, "bfloat16", "float16", "float32"):
        raise ConfigError(f"model.dtype={cfg.model.dtype!r} is not one of bfloat16, float16, float32, null; set "
                          "model.dtype=<one of them> (null: the compute dtype)")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.trainer.activation_offload and not cfg.trainer.gradient_checkpointing:
        raise ConfigError("trainer.activation_offload=true offloads the inputs of checkpointed layers and needs "
                          "trainer.gradient_checkpointing=true; set it, or set trainer.activation_offload=false")
    check_objective(cfg)
    if cfg.trainer.loss_chunk_size is not None and cfg.trainer.loss_chunk_size <= 0:
        raise ConfigError(f"trainer.loss_chunk_size must be > 0 or null, got {cfg.trainer.loss_chunk_size}")
    _validate_lora_init(cfg)
    _validate_init_lora_weights(cfg.lora.get("init_lora_weights", True))
    _validate_distributed(cfg)
    for key in ("optimizer", "scheduler", "data.format"):
        node = _select(cfg, key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{key} must be a node with a _target_ (an importable class or function), got {node!r}")
    if cfg.trainer.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"trainer.nonfinite={cfg.trainer.nonfinite!r} is not one of stop, skip; "
                          "set trainer.nonfinite=stop or trainer.nonfinite=skip")
    if cfg.trainer.max_nonfinite_skips < 0:
        raise ConfigError(f"trainer.max_nonfinite_skips must be >= 0, got {cfg.trainer.max_nonfinite_skips}")
    check_targets(cfg)


# PEFT's LoraConfig.init_lora_weights: a bool or one of its named initialisations (checked here, before
# the model loads; PEFT would only refuse it when the adapter is attached).
_INIT_LORA_WEIGHTS = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal")


def _validate_init_lora_weights(value) -> None:
    if isinstance(value, bool) or value in _INIT_LORA_WEIGHTS or str(value).startswith("pissa_niter_"):
        return
    raise ConfigError(f"lora.init_lora_weights={value!r} is not one of true, false, {', '.join(_INIT_LORA_WEIGHTS)}, "
                      "pissa_niter_<n>; set lora.init_lora_weights=true (LoRA's default)")


def _validate_lora_init(cfg: DictConfig) -> None:
    if cfg.lora.init != "loftq":
        return
    if cfg.lora.loftq_iter < 1:
        raise ConfigError(f"lora.loftq_iter must be >= 1 (LoftQ alternations of quantize and SVD), got "
                          f"{cfg.lora.loftq_iter}")
    if cfg.quantization.quant_type == "none":
        raise ConfigError("lora.init=loftq corrects the quantization error, and quantization=none has none; "
                          "set quantization=nf4 (or fp4), or lora.init=default")
    if cfg.lora.use_dora:
        raise ConfigError("lora.init=loftq with lora.use_dora=true is not supported (DoRA's magnitude is taken from "
                          "the base before LoftQ rewrites it); set lora.use_dora=false or lora.init=default")


def _validate_distributed(cfg: DictConfig) -> None:
    d = cfg.distributed
    if d.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be > 0, got {d.timeout_s}")
    for key in ("hybrid_shard", "cpu_offload"):
        if d[key] and d.strategy != "fsdp2":
            raise ConfigError(f"distributed.{key}=true is an FSDP2 option; set distributed=fsdp2 or "
                              f"distributed.{key}=false")
    if d.low_memory_load:
        _validate_low_memory_load(cfg)
    if d.strategy != "none" and cfg.trainer.chunked_loss:
        raise ConfigError(f"trainer.chunked_loss=true calls the LM head outside the {d.strategy} wrapper, which "
                          f"would skip its gradient sync / parameter gathering; set trainer.chunked_loss=false "
                          f"with distributed={d.strategy}")


def _validate_low_memory_load(cfg: DictConfig) -> None:
    if cfg.distributed.strategy != "fsdp2":
        raise ConfigError(
            f"distributed.low_memory_load=true loads each rank's FSDP2 shards and applies to distributed=fsdp2 only; "
            f"with distributed={cfg.distributed.strategy} every process holds the whole base, which the normal "
            "loader already streams one tensor at a time: set distributed.low_memory_load=false (or distributed=fsdp2)")
    refused = {
        "quantization.quant_type=none": cfg.quantization.quant_type == "none",
        "quantization.method=gptq": cfg.quantization.get("method", "bitsandbytes") == "gptq",
        "lora.init=loftq": cfg.lora.init == "loftq",
        "lora.use_dora=true": cfg.lora.use_dora,
    }
    for option, applies in refused.items():
        if applies:
            raise ConfigError(f"distributed.low_memory_load=true cannot be combined with {option}: it needs the whole "
                              "dense or quantized base on one process before sharding (calibration, LoftQ's SVD, "
                              "DoRA's weight norm); set distributed.low_memory_load=false")


def check_device(cfg: DictConfig) -> str:
    """trainer.device as this machine can honour it ("cpu", "cuda" or "cuda:N"; null = cuda when there
    is one), checked before anything loads: a device that is not one, or CUDA where there is none, is
    refused; so is fp16 autocast on a CPU, which accelerate silently runs in fp32 (the loss came out
    identical to trainer.mixed_precision=no)."""
    import torch

    value = cfg.trainer.device
    device = str(value).strip().lower() if value is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device)
    if problem == "not a device":
        raise ConfigError(f"trainer.device={value!r} is not a device; set trainer.device=cpu, cuda, cuda:<index>, "
                          "or null (cuda when there is one)")
    if problem == "no cuda":
        raise ConfigError(f"trainer.device={value} but this machine has no CUDA device torch can use; set "
                          "trainer.device=cpu (or null)")
    if problem == "no such index":
        raise ConfigError(f"trainer.device={value} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "cpu" and cfg.trainer.mixed_precision == "fp16":
        raise ConfigError("trainer.mixed_precision=fp16 cannot run on a CPU (it would train in fp32 without a word); "
                          "set trainer.mixed_precision=bf16 or no")
    return device
