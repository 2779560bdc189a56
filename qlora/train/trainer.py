"""The training loop: accelerate for devices and precision, token-normalized gradient
accumulation, clipping, evaluation, atomic checkpoints and exact resume."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

from typing import Any

import torch
from tqdm.auto import tqdm

from qlora import distributed as qdist
from qlora.data.collate import count_supervised_tokens
from qlora.data.formats import save_prompt_format
from qlora.data.order import epoch_order, example_lengths
from qlora.errors import UserError
from qlora.lora import base_model
from qlora.staging import staged_directory
from qlora.train import checkpoint as ckpt
from qlora.train.evaluation import evaluate_loss, exact_match, generate
from qlora.train.loss import check_chunked_loss
from qlora.train import base_score, preference
from qlora.train.offload import ActivationOffloader
from qlora.train.state import TrainerState

log = logging.getLogger("qlora.train")


@dataclasses.dataclass
class TrainingSetup:
    """What runner.build() makes from a recipe: the trainer's inputs."""

    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module  # the 4-bit base with LoRA, prepared by accelerate
    tokenizer: Any
    train_data: Any  # datasets.Dataset of tokenized (maybe packed) examples
    eval_data: Any  # datasets.Dataset or None
    collator: Any  # qlora.data.Collator
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LR scheduler
    prompt_format: dict  # the resolved data.format node, recorded with every adapter for generation
    objective: Any = None  # qlora.objectives.Objective; None = SFT


class NonFiniteLossError(UserError, RuntimeError):
    """The loss, the gradients or the weights became NaN or inf; the message names the step and the
    newest good checkpoint, which is left as it was."""


class EpochSampler(torch.utils.data.Sampler):
    """The epoch's order (qlora.data.order), starting `skip` samples in: resuming replays the same order.
    lengths: group by length (data.group_by_length), in mega-batches of micro_batch_size examples."""

    def __init__(self, size: int, seed: int, epoch: int, skip: int = 0, lengths: list[int] | None = None,
                 micro_batch_size: int = 1):
        self.size, self.seed, self.epoch, self.skip = size, seed, epoch, skip
        self.lengths, self.micro_batch_size = lengths, micro_batch_size

    def __iter__(self):
        return iter(epoch_order(self.size, self.seed, self.epoch, self.lengths, self.micro_batch_size)[self.skip:])

    def __len__(self):
        return self.size - self.skip


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Trainer:
    def __init__(self, cfg, run_dir: Path, setup: TrainingSetup, metrics):
        self.cfg, self.t = cfg, cfg.trainer
        self.run_dir, self.accelerator = run_dir, setup.accelerator
        self.model, self.tokenizer = setup.model, setup.tokenizer
        self.train_data, self.eval_data, self.collator = setup.train_data, setup.eval_data, setup.collator
        self.optimizer, self.scheduler, self.metrics = setup.optimizer, setup.scheduler, metrics
        self.prompt_format = setup.prompt_format
        # SFT unless the recipe names a preference objective (qlora.objectives); a setup built by hand is SFT.
        self.objective = setup.objective or preference.sft_objective(cfg)
        self.state = TrainerState()
        # The examples' lengths when micro-batches are grouped by length (qlora.data.order).
        self.lengths = example_lengths(self.train_data) if cfg.data.group_by_length else None
        self.resumed_from: Path | None = None
        # The base's checkpoint folder, which keys the remembered before-training score (base_score).
        self.base_checkpoint = getattr(base_model(setup.accelerator.unwrap_model(setup.model)), "qlora_checkpoint_dir",
                                       None)
        accelerator, model, optimizer = setup.accelerator, setup.model, setup.optimizer
        self.world = qdist.current()  # distributed: ranks, sums over them (a single process without)
        if self.t.chunked_loss:
            check_chunked_loss(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
        if hasattr(inner, "state_bytes"):
            where = (f"in host memory, paged through {inner.device_state_bytes() / 2**20:.1f} MiB of device buffers"
                     if inner.paged and accelerator.device.type == "cuda" else f"on {accelerator.device.type}")
            log.info("optimizer %s: %.1f MiB of states %s", type(inner).__name__, inner.state_bytes() / 2**20, where)
        self.offloader = None
        if self.t.activation_offload:
            if accelerator.device.type == "cuda":
                self.offloader = ActivationOffloader(model)
            else:
                log.info("trainer.activation_offload: the model is on %s, where activations already live in host "
                         "memory; nothing to offload", accelerator.device.type)

    # ---- data ---------------------------------------------------------------------------------
    def _loader(self, dataset, sampler=None):
        # A private generator: creating a DataLoader iterator draws a seed from it, and drawing
        # from the global RNG instead would shift the dropout masks of a resumed run.
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.t.micro_batch_size, sampler=sampler,
                                             collate_fn=self.collator, num_workers=self.t.num_workers,
                                             generator=torch.Generator().manual_seed(self.cfg.data.seed))
        if self.world.active:  # distributed: every rank evaluates the same batches; training deals its own
            from qlora.distributed.data import DeviceLoader

            return DeviceLoader(loader, self.accelerator.device)
        return self.accelerator.prepare_data_loader(loader, device_placement=True)

    def _micro_batches(self):
        """Endless micro-batches in seeded epoch order; self.state tracks the position to resume at."""
        if self.world.active:  # distributed: this rank's part of the single-process stream
            from qlora.distributed.data import rank_micro_batches

            yield from rank_micro_batches(self.train_data, self.collator, self.state, self.t.micro_batch_size,
                                          self.t.gradient_accumulation_steps, self.cfg.data.seed, self.world,
                                          self.accelerator.device, self.lengths)
        while True:
            epoch, batch = self.state.epoch, self.state.batch
            sampler = EpochSampler(len(self.train_data), self.cfg.data.seed, epoch, batch * self.t.micro_batch_size,
                                   self.lengths, self.t.micro_batch_size)
            for item in self._loader(self.train_data, sampler):
                self.state.batch += 1
                yield item
            self.state.epoch, self.state.batch = epoch + 1, 0

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        results = {}
        if self.objective.name != "sft" and self.eval_data is not None and len(self.eval_data):
            return preference.evaluate(self, step)
        if self.eval_data is not None and len(self.eval_data):
            results = evaluate_loss(self.model, self._loader(self.eval_data), self.t.eval_batches, self.accelerator.autocast,
                                    self.t.chunked_loss, self.t.loss_chunk_size)
            samples = [self.eval_data[i] for i in range(min(self.t.eval_samples, len(self.eval_data)))]
            if samples:
                outputs = generate(self.accelerator.unwrap_model(self.model), self.tokenizer,
                                   [s["prompt"] for s in samples], self.t.max_new_tokens, self.t.generation_batch_size)
                rows = [{"prompt": s["prompt"], "generated": o} for s, o in zip(samples, outputs)]
                self.metrics.log_text("samples", rows, step)
                for row in rows:
                    log.info("sample at step %d:\n%s[generated] %s", step, row["prompt"], row["generated"])
            self.metrics.log(results, step)
            self.state.evals.append({"step": step, **results})
            log.info("step %d: eval loss %.4f, perplexity %.2f", step, results["eval_loss"], results["eval_ppl"])
        return results

    def exact_match_score(self, step: int, label: str) -> float | None:
        if not self.t.exact_match_examples or self.eval_data is None:
            return None
        examples = preference.exact_match_examples(self.eval_data, self.t.exact_match_examples)
        count = len(examples)
        entry = base_score.key(self.cfg, self.base_checkpoint, self.accelerator.device.type, examples,
                               self.t.max_new_tokens) if label == "before" and self.base_checkpoint else None
        score = base_score.recall(entry)
        if score is not None:
            self.metrics.log({f"exact_match_{label}": score}, step)
            log.info("exact match %s training: %.1f%% of %d held-out prompts (the base's score on these prompts, "
                     "remembered from an earlier run; QLORA_CACHE_DIR holds it)", label, 100 * score, count)
            return score
        score, rows = exact_match(self.accelerator.unwrap_model(self.model), self.tokenizer, examples,
                                  self.t.max_new_tokens, self.t.generation_batch_size)
        base_score.remember(entry, score)
        self.metrics.log({f"exact_match_{label}": score}, step)
        log.info("exact match %s training: %.1f%% of %d held-out prompts", label, 100 * score, count)
        return score

    # ---- checkpoints --------------------------------------------------------------------------
    def newest_good_checkpoint(self) -> str:
        """The newest checkpoint of this run that matches its manifest (they are checked finite when written)."""
        kept = ckpt.intact_checkpoints(ckpt.checkpoint_dir(self.run_dir))
        if kept:
            return str(kept[-1])
        return str(self.resumed_from) if self.resumed_from is not None else "none yet"

    def check_finite(self, what: str) -> None:
        """Refuse to write non-finite weights or optimizer state: they would poison every resume."""
        bad = ckpt.first_nonfinite(self.accelerator.unwrap_model(self.model), self.optimizer)
        if bad is not None:
            raise NonFiniteLossError(
                f"{bad} holds NaN/inf at step {self.state.step}, so {what} was not written. Last good "
                f"checkpoint: {self.newest_good_checkpoint()}. Lower optimizer.lr or set trainer.max_grad_norm")

    def write_adapter(self, directory: Path, state_dict: dict | None = None) -> None:
        """The PEFT adapter, the tokenizer, and the prompt format generation must use with them.
        `state_dict`: the adapter's full tensors when they are sharded across ranks (gathered first)."""
        from qlora.distributed.sharding import unwrap

        # Only the trained adapter: a frozen reference copy (qlora.objectives) is the starting adapter.
        unwrap(self.accelerator.unwrap_model(self.model)).save_pretrained(directory, state_dict=state_dict,
                                                                          selected_adapters=["default"])
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        save_prompt_format(directory, self.prompt_format)

    def save_adapter(self, directory: Path) -> Path:
        """The final adapter: checked finite, staged, with a manifest that export and generate verify."""
        self.check_finite(str(directory))
        state_dict = None
        if self.world.active:  # distributed: every rank gathers the shards, rank 0 alone writes
            from qlora.distributed.sharding import full_trainable_state

            state_dict = full_trainable_state(self.model, self.world)
        if self.world.is_main:
            with staged_directory(directory) as staging:
                self.write_adapter(staging, state_dict)
                ckpt.write_manifest(staging)
        if self.world.active:
            self.world.barrier("writing the adapter")
        return directory

    def save(self, step: int) -> Path:
        self.check_finite(f"checkpoint step-{step:06d}")
        if self.world.active:  # distributed: sharded through torch.distributed.checkpoint
            from qlora.distributed.checkpoint import save_sharded

            path = save_sharded(self.run_dir, step, self.model, self.optimizer, self.scheduler, self.state,
                                self.t.keep_last, self.world)
            log.info("checkpoint saved: %s", path)
            return path
        path = ckpt.save_checkpoint(self.run_dir, step, self.write_adapter, self.optimizer,
                                    self.scheduler, self.state, self.t.keep_last)
        log.info("checkpoint saved: %s", path)
        return path

    def resume_from(self, path: Path) -> None:
        if self.world.active:
            from qlora.distributed.checkpoint import load_sharded

            self.state = load_sharded(Path(path), self.model, self.optimizer, self.scheduler, self.world)
            self.resumed_from = path
            log.info("resumed from %s at step %d", path, self.state.step)
            return
        self.state = ckpt.load_checkpoint(path, self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler)
        self.resumed_from = path
        log.info("resumed from %s at step %d", path, self.state.step)

    def _nonfinite(self, step: int, what: str) -> None:
        """A step whose loss or gradients are not finite: its update is dropped; stop, or skip on."""
        self.optimizer.zero_grad(set_to_none=True)
        advice = "Lower optimizer.lr, set trainer.max_grad_norm, or check the data around this step"
        if self.t.nonfinite == "stop":
            raise NonFiniteLossError(f"{what} at step {step}; the update was not applied. Last good checkpoint: "
                                     f"{self.newest_good_checkpoint()}. {advice} (trainer.nonfinite=skip drops "
                                     "such steps and goes on)")
        self.state.nonfinite_skips += 1
        if self.state.nonfinite_skips > self.t.max_nonfinite_skips:
            raise NonFiniteLossError(f"{what} at step {step}, {self.state.nonfinite_skips} steps in a row; "
                                     f"trainer.max_nonfinite_skips={self.t.max_nonfinite_skips} reached. Last good "
                                     f"checkpoint: {self.newest_good_checkpoint()}. {advice}")
        log.warning("step %d: %s; the update was skipped (%d in a row, at most trainer.max_nonfinite_skips=%d)",
                    step, what, self.state.nonfinite_skips, self.t.max_nonfinite_skips)

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> TrainerState:
        t, acc = self.t, self.accelerator
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        batches = self._micro_batches()
        bar = tqdm(total=t.max_steps, initial=self.state.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not self.world.is_main)
        started, tokens_at_start = time.perf_counter(), self.state.tokens
        first_step = self.state.step + 1
        self.model.train()
        while self.state.step < t.max_steps:
            step = self.state.step + 1
            micro = [next(batches) for _ in range(t.gradient_accumulation_steps)]
            # distributed: the step's supervised tokens over all ranks; DDP and FSDP2 average the
            # gradients over ranks, so each rank's loss is scaled by the world size (exact for 2^k).
            supervised = int(self.world.sum(sum(count_supervised_tokens(b["labels"]) for b in micro)))
            # What normalises the loss, summed over the step: supervised tokens for SFT, pairs (and for
            # ORPO chosen tokens) or examples for the preference objectives.
            totals = {"tokens": supervised} if self.objective.name == "sft" else \
                preference.step_totals(self.objective, micro, self.world)
            numerators, stats = dict.fromkeys(totals, 0.0), preference.Stats()
            for i, batch in enumerate(micro):
                # The step's loss is the sum over all its supervised tokens / their count, so
                # every token weighs the same whatever micro-batch it fell in.
                sync = acc.no_sync(self.model) if i < len(micro) - 1 else nullcontext()
                with sync, acc.autocast(), self.offloader or nullcontext():
                    terms = preference.loss_terms(self.objective, self.model, batch, stats)
                acc.backward(sum(terms[key] * self.world.size / max(totals[key], 1) for key in terms))
                for key, value in terms.items():
                    numerators[key] += value.item()
            loss = sum(self.world.sum(numerators[key]) / max(totals[key], 1) for key in totals)
            self.state.step = step
            local_tokens = sum(int(b["attention_mask"].sum()) if b["attention_mask"].dim() == 2
                               else int(b["input_ids"].numel()) for b in micro)
            self.state.tokens += int(self.world.sum(local_tokens))  # global tokens: the bar's tok_s is global
            # The gradient norm is computed even without clipping (an infinite max norm scales by 1.0):
            # at a too-high lr the loss can still be finite while the gradients already are not, and
            # applying that step would write NaN into every adapter weight.
            grad_norm = acc.clip_grad_norm_(trainable, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0
            # Under fp16 loss scaling an inf gradient is routine: the scaler skips that update and lowers
            # its scale, so only the loss decides there.
            scaled = getattr(acc, "scaler", None) is not None
            if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not scaled):
                self._nonfinite(step, f"loss is {loss}" if not math.isfinite(loss) else
                                f"the gradient norm is {grad_norm} (loss {loss:.4f})")
                self.state.history.append({"step": step, "loss": loss, "skipped": True})
                bar.update(1)
                continue
            self.state.nonfinite_skips = 0
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            record = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "supervised_tokens": supervised,
                      "tokens_per_s": (self.state.tokens - tokens_at_start) / max(elapsed, 1e-9),
                      "peak_memory_gb": peak_memory_bytes(acc.device) / 2**30}
            if t.max_grad_norm > 0:
                record["grad_norm"] = grad_norm
            record.update(stats.means(self.world.sum))  # rewards/..., logps/... under TRL's names
            self.state.history.append({"step": step, "loss": loss})
            if self.offloader is not None and step == first_step:
                log.info("activation offload: %d layer inputs, %.2f GiB in host memory per micro-batch",
                         self.offloader.offloaded_count, self.offloader.offloaded_bytes / 2**30)
            if step % t.log_every == 0 or step == t.max_steps:
                self.metrics.log(record, step)
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.4f}", **preference.progress_fields(record), "lr": f"{record['lr']:.2e}",
                             "tok_s": f"{record['tokens_per_s']:.0f}", "mem": f"{record['peak_memory_gb']:.2f}G"})
            if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                self.evaluate(step)
            if t.save_every and step % t.save_every == 0 and step != t.max_steps:
                self.save(step)
        bar.close()
        self.state.train_seconds += time.perf_counter() - started
        return self.state

