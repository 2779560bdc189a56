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
from qlora.train import checkpoint as ckpt
from qlora.train.report import format_summary, plot_loss_curve, write_summary
from qlora.train.schema import validate
from qlora.train.tracking import MetricsLogger
from qlora.train.trainer import Trainer, peak_memory_bytes

log = logging.getLogger("qlora.train")


def _hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _model_path(cfg: DictConfig) -> str:
    if cfg.model.name_or_path == "embedded":
        from qlora.embedded import BASE_MODEL_DIR

        return str(BASE_MODEL_DIR)
    return cfg.model.name_or_path


def _data_sources(cfg: DictConfig) -> tuple[str, Optional[str]]:
    if cfg.data.source == "embedded":
        from qlora.embedded import TASK_EVAL, TASK_TRAIN

        return str(TASK_TRAIN), str(TASK_EVAL)
    return cfg.data.source, cfg.data.eval_source


def build(cfg: DictConfig, run_dir: Path):
    """Accelerator, tokenizer, 4-bit model with LoRA, data, optimizer and scheduler."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    import qlora
    from qlora.data import Collator, prepare_datasets
    from qlora.lora import attach_lora, describe_trainable

    set_seed(cfg.trainer.seed)
    device = cfg.trainer.device or ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(mixed_precision=cfg.trainer.mixed_precision, cpu=device == "cpu")
    path = _model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention anyway
    q = cfg.quantization
    qconfig = qlora.QuantConfig(quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=q.compute_dtype,
                                blocksize=q.blocksize, quant_storage=q.quant_storage, skip_modules=list(q.skip_modules))
    dense_dtype = getattr(torch, cfg.model.dtype) if cfg.model.dtype else None
    model = qlora.load_model(path, qconfig, device=accelerator.device, dtype=dense_dtype, revision=cfg.model.revision,
                             trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
    lora = cfg.lora
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    model = attach_lora(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                        use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias=lora.bias,
                        init_lora_weights=lora.init_lora_weights, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    log.info(describe_trainable(model))
    # distributed: DDP / fully_shard before the optimizer exists (it must see the sharded parameters).
    world = qdist.current()
    if world.active:
        from qlora.distributed.sharding import wrap

        model = wrap(model, world, cfg.distributed, cfg.trainer.mixed_precision, accelerator.device)

    source, eval_source = _data_sources(cfg)
    d = cfg.data
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
    return accelerator, model, tokenizer, train_data, eval_data, Collator(tokenizer.pad_token_id), optimizer, scheduler


def run(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict:
    """Train as `cfg` says; returns the run summary. Outputs go to run_dir (Hydra's by default)."""
    validate(cfg)
    # distributed: join the launcher's process group; rank 0's run folder and resume choice hold
    # for all (Hydra's timestamped folder can differ by a second between ranks).
    world = qdist.setup(cfg.distributed.strategy, cfg.trainer.device, cfg.distributed.timeout_s)
    run_dir = Path(world.broadcast(str(run_dir if run_dir is not None else _hydra_run_dir())))
    if not world.is_main:
        logging.getLogger("qlora").setLevel(logging.WARNING)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resume = world.broadcast(ckpt.find_resume_checkpoint(cfg.trainer.resume, run_dir) if world.is_main else None)
    started = time.perf_counter()
    parts = build(cfg, run_dir)
    accelerator, model, tokenizer = parts[:3]
    metrics = MetricsLogger(run_dir, cfg) if world.is_main else qdist.SilentMetrics()
    trainer = Trainer(cfg, run_dir, *parts, metrics=metrics)
    failed = True
    try:
        if resume is not None:
            trainer.resume_from(resume)
        if "exact_match_before" not in trainer.state:
            trainer.state["exact_match_before"] = trainer.exact_match_score(trainer.state["step"], "before")
        state = trainer.train()
        final_eval = trainer.evaluate(state["step"])
        after = trainer.exact_match_score(state["step"], "after")
        trainer.save(state["step"])
        if world.active:  # distributed: shards gathered, one plain PEFT adapter written by rank 0
            from qlora.distributed.checkpoint import save_adapter

            save_adapter(model, run_dir / "adapter", world)
        else:
            accelerator.unwrap_model(model).save_pretrained(run_dir / "adapter")
        if tokenizer is not None and world.is_main:
            tokenizer.save_pretrained(run_dir / "adapter")
        summary = {
            "steps": state["step"],
            "tokens": state["tokens"],
            "wall_seconds": time.perf_counter() - started,
            "train_seconds": state["train_seconds"],
            "peak_memory_gb": peak_memory_bytes(accelerator.device) / 2**30,
            "final_eval_loss": final_eval.get("eval_loss"),
            "final_eval_ppl": final_eval.get("eval_ppl"),
            "exact_match_before": state.get("exact_match_before"),
            "exact_match_after": after,
            "adapter": str(run_dir / "adapter"),
            **qdist.summary_fields(model, world),
        }
        summary = {k: v for k, v in summary.items() if v is not None}
        if world.is_main:
            write_summary(run_dir, summary)
            plot_loss_curve(run_dir, state["history"], state.get("evals", []))
        metrics.summary(summary)
        log.info(format_summary(summary))
        failed = False
        return summary
    except Exception as err:  # distributed: a dead peer surfaces inside FSDP2/DDP collectives as well
        lost = world.peer_lost(err)
        if lost is None:
            raise
        raise lost from err
    finally:
        metrics.close(failed=failed)
        qdist.teardown(world)
