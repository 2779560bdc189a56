"""run(cfg): build everything a recipe describes and train. Called by train.py under Hydra."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qlora import distributed as qdist
from qlora.data.loading import check_sources
from qlora.errors import DamagedFileError, UserError
from qlora.train import checkpoint as ckpt
from qlora.train import preference
from qlora.train.invocation import interrupted_message
from qlora.train.recipes import dense_dtype, model_path, quant_config, resolve_compute_dtype
from qlora.train.report import format_summary, plot_loss_curve, write_summary
from qlora.train.schema import ConfigError
from qlora.train.recipe_checks import check_device, validate
from qlora.train.tracking import MetricsLogger
from qlora.train.trainer import Trainer, TrainingSetup, peak_memory_bytes

log = logging.getLogger("qlora.train")


class RunInterrupted(UserError):
    """Ctrl-C: the message says where the run stopped and how to continue it."""


def _hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _data_sources(cfg: DictConfig) -> tuple[str, Optional[str]]:
    if cfg.data.source == "embedded":
        from qlora.embedded import TASK_EVAL, TASK_TRAIN

        return str(TASK_TRAIN), str(TASK_EVAL)
    if cfg.data.source == "embedded_preferences":
        from qlora.embedded.preferences import PREFERENCE_EVAL, PREFERENCE_TRAIN

        return str(PREFERENCE_TRAIN), str(PREFERENCE_EVAL)
    return cfg.data.source, cfg.data.eval_source


def load_base(cfg: DictConfig, device):
    """(tokenizer, 4-bit model) for the recipe's model. The path is resolved first (a local directory,
    or the Hub, failing fast offline), so a wrong path is reported as such and nothing below it treats
    it as a Hub id; whatever reading the checkpoint raises comes back naming model.name_or_path."""
    from transformers import AutoTokenizer

    import qlora
    from qlora.models.checkpoint import resolve_checkpoint

    name = cfg.model.name_or_path
    directory = resolve_checkpoint(model_path(name), cfg.model.revision, option="model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise DamagedFileError(f"model.name_or_path={name}: the tokenizer in {directory} could not be loaded "
                               f"({type(err).__name__}: {err}); check that the folder holds tokenizer files") from err
    if not getattr(tokenizer, "chat_template", None):  # a vision-language checkpoint may keep it with its processor
        from qlora.models.families import processor_chat_template

        tokenizer.chat_template = processor_chat_template(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention anyway
    try:
        if cfg.quantization.quant_type == "none":  # the 16-bit LoRA baseline
            from qlora.baseline import load_dense_model

            model = load_dense_model(directory, getattr(torch, cfg.quantization.compute_dtype), dense_dtype(cfg.model),
                                     device, list(cfg.quantization.skip_modules), cfg.model.revision,
                                     cfg.model.trust_remote_code, cfg.model.attn_implementation)
        else:
            if cfg.quantization.get("method", "bitsandbytes") == "gptq":
                # Train on a GPTQ checkpoint of the model, quantized on first use and cached.
                from qlora.models.gptq_base import gptq_base

                directory = gptq_base(directory, OmegaConf.to_container(cfg.quantization.gptq), device=device)
            model = qlora.load_model(directory, quant_config(cfg.quantization), device=device,
                                     dtype=dense_dtype(cfg.model), trust_remote_code=cfg.model.trust_remote_code,
                                     attn_implementation=cfg.model.attn_implementation,
                                     quantize_vision_tower=cfg.model.quantize_vision_tower)
    except (OSError, ValueError, NotImplementedError) as err:
        # Name the recipe key; a UserError keeps its type (an InputPathError stays one), anything else
        # raised while reading the checkpoint is a damaged or unsupported file.
        kind = type(err) if isinstance(err, UserError) else DamagedFileError
        raise kind(f"model.name_or_path={name}: {err}") from err
    model.config.name_or_path = model_path(name)  # what adapters record as their base, not a cache path
    return tokenizer, model


def build(cfg: DictConfig, run_dir: Path) -> TrainingSetup:
    """Accelerator, tokenizer, 4-bit model with LoRA, data, optimizer and scheduler. `run_dir` receives
    what an initialisation writes beside the run (LoftQ's report and its quantized base)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from qlora.data import prepare_datasets
    from qlora.lora import attach_lora, describe_trainable

    set_seed(cfg.trainer.seed)
    device = cfg.trainer.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_compute_dtype(cfg, device)  # run() has done it already; a setup built by hand has not
    accelerator = Accelerator(mixed_precision=cfg.trainer.mixed_precision, cpu=device == "cpu")
    # distributed.low_memory_load: a meta skeleton now, filled shard by shard once FSDP2 has sharded it.
    low_memory = cfg.distributed.get("low_memory_load", False)
    tokenizer, model = load_base(cfg, torch.device("meta") if low_memory else accelerator.device)
    lora = cfg.lora
    if lora.init == "loftq":
        from qlora.loftq import initialize_for_run

        loftq = initialize_for_run(cfg, model, model_path(cfg.model.name_or_path), run_dir, tokenizer)
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    if cfg.model.get("adapter"):  # continue from a trained adapter (SFT-then-DPO); also DPO/KTO's reference
        model = preference.load_starting_adapter(model, cfg.model.adapter, cfg.objective.name,
                                                 cfg.trainer.gradient_checkpointing)
    else:
        try:
            model = attach_lora(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                                use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias=lora.bias,
                                init_lora_weights=lora.init_lora_weights, target_experts=lora.target_experts,
                                gradient_checkpointing=cfg.trainer.gradient_checkpointing)
        except (ValueError, NotImplementedError) as err:  # PEFT's and qlora's refusals of a LoRA option
            if isinstance(err, UserError):
                raise
            raise ConfigError(f"lora: {err}") from err
    if lora.init == "loftq":
        loftq.apply(model)
    log.info(describe_trainable(model))
    # distributed: DDP / fully_shard before the optimizer exists (it must see the sharded parameters).
    world = qdist.current()
    if world.active:
        from qlora.distributed.sharding import wrap

        model = wrap(model, world, cfg.distributed, cfg.trainer.mixed_precision, accelerator.device)
    if low_memory:
        from qlora.distributed.low_memory import load_into_shards

        load_into_shards(model, world, accelerator.device,
                         torch.device("cpu") if cfg.distributed.cpu_offload else accelerator.device)

    source, eval_source = _data_sources(cfg)
    d = cfg.data
    objective = preference.objective_for(cfg)
    if objective.name != "sft":  # pairs (or KTO's unpaired examples) instead of prompt/completion examples
        train_data, eval_data = preference.prepare_data(cfg, tokenizer, source, eval_source, instantiate(d.format))
    else:
        train_data, eval_data = prepare_datasets(
            tokenizer, source=source, format=instantiate(d.format), max_seq_len=d.max_seq_len, split=d.split,
            eval_source=eval_source, eval_fraction=d.eval_fraction, truncation=d.truncation,
            completion_only_loss=d.completion_only_loss, packing=d.packing, seed=d.seed,
        )
    log.info("data: %d training sequences, %d held-out examples", len(train_data), len(eval_data or []))
    optimizer = instantiate(cfg.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, num_training_steps=cfg.trainer.max_steps)
    if world.active:
        # distributed: accelerate must neither wrap the model again nor step the scheduler once per
        # process (its AcceleratedScheduler does that when batches are not split).
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return TrainingSetup(accelerator=accelerator, model=model, tokenizer=tokenizer, train_data=train_data,
                         eval_data=eval_data, collator=objective.collator(tokenizer.pad_token_id), optimizer=optimizer,
                         scheduler=scheduler, prompt_format=OmegaConf.to_container(d.format, resolve=True),
                         objective=objective)


def _check_resume_leaves_work(resume: Optional[Path], max_steps: int) -> None:
    if resume is None:
        return
    step = ckpt.read_state(resume).step
    if step >= max_steps:
        raise ConfigError(f"trainer.resume: checkpoint {resume} is already at step {step}, and trainer.max_steps="
                          f"{max_steps} leaves nothing to train; set trainer.max_steps above {step}")


def run(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict:
    """Train as `cfg` says; returns the run summary. Outputs go to run_dir (Hydra's by default)."""
    validate(cfg)
    device = check_device(cfg)
    dtype_note = resolve_compute_dtype(cfg, device)  # before config.yaml is written: it records the dtype used
    check_sources(*_data_sources(cfg))  # a missing data file is named before the model loads
    # distributed: join the launcher's process group; rank 0's run folder and resume choice hold
    # for all (Hydra's timestamped folder can differ by a second between ranks).
    world = qdist.setup(cfg.distributed.strategy, cfg.trainer.device, cfg.distributed.timeout_s)
    run_dir = Path(world.broadcast(str(run_dir if run_dir is not None else _hydra_run_dir())))
    if not world.is_main:
        logging.getLogger("qlora").setLevel(logging.WARNING)
    resume = world.broadcast(ckpt.find_resume_checkpoint(cfg.trainer.resume, run_dir) if world.is_main else None)
    _check_resume_leaves_work(resume, cfg.trainer.max_steps)
    if resume is not None:
        changed = ckpt.check_resume_compatible(Path(resume), cfg)
        log.info("continuing run %s from step %d (%s)%s", Path(resume).parent.parent, ckpt.step_of(Path(resume)),
                 resume, "; changed since: " + "; ".join(changed) if changed else "")
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    started = time.perf_counter()
    if dtype_note:
        log.info(dtype_note)
    setup = build(cfg, run_dir)
    metrics = MetricsLogger(run_dir, cfg) if world.is_main else qdist.SilentMetrics()
    trainer = Trainer(cfg, run_dir, setup, metrics)
    failed = True
    try:
        if resume is not None:
            trainer.resume_from(resume)
        preference.prepare_reference(trainer, resume)  # DPO/KTO with objective.precompute_reference only
        if trainer.state.exact_match_before is None:
            trainer.state.exact_match_before = trainer.exact_match_score(trainer.state.step, "before")
        state = trainer.train()
        final_eval = trainer.evaluate(state.step)
        after = trainer.exact_match_score(state.step, "after")
        trainer.save(state.step)
        trainer.save_adapter(run_dir / "adapter")
        summary = {
            "steps": state.step,
            "tokens": state.tokens,
            "wall_seconds": time.perf_counter() - started,
            "train_seconds": state.train_seconds,
            "peak_memory_gb": peak_memory_bytes(setup.accelerator.device) / 2**30,
            "final_eval_loss": final_eval.get("eval_loss"),
            "final_eval_ppl": final_eval.get("eval_ppl"),
            "exact_match_before": state.exact_match_before,
            "exact_match_after": after,
            "adapter": str(run_dir / "adapter"),
            **qdist.summary_fields(setup.model, world),
        }
        summary = {k: v for k, v in summary.items() if v is not None}
        if world.is_main:
            write_summary(run_dir, summary)
            plot_loss_curve(run_dir, state.history, state.evals)
        metrics.summary(summary)
        log.info(format_summary(summary))
        failed = False
        return summary
    except KeyboardInterrupt:
        newest = trainer.newest_good_checkpoint()
        raise RunInterrupted(interrupted_message(trainer.state.step, None if newest == "none yet" else Path(newest))) \
            from None
    except Exception as err:  # distributed: a dead peer surfaces inside FSDP2/DDP collectives as well
        lost = world.peer_lost(err)
        if lost is None:
            raise
        raise lost from err
    finally:
        metrics.close(failed=failed)
        qdist.teardown(world)
