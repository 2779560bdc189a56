"""`qlora eval`: held-out loss, perplexity and exact match of a trained model, written to eval.json.

What it evaluates (the `model=` / `run_dir=` argument):
- a training run directory, or a bare PEFT adapter directory with `base=`: base + adapter, the base
  loaded as the run trained it (4-bit in the run's format, its LoftQ base, or 16-bit for
  `quantization=none`);
- a merged model (`qlora export`), or a 4-bit checkpoint (anything with a bitsandbytes
  `quantization_config`, loaded by qlora.load_model).

On what: `data=` (any source and record format the trainer reads), or by default the run's own
held-out set, split exactly as training split it. The loss is the trainer's: mean over completion
tokens. Exact match greedy-decodes each prompt and compares with the completion (whitespace-trimmed).
Preference pairs (`format=preference`, or a run trained on them) are scored by the implicit reward
of the run's objective instead of loss and perplexity: reward accuracy (the share of held-out pairs
whose chosen answer out-scores the rejected one) and reward margin, as TRL logs them; DPO/KTO's
reward is beta * (log-prob - the base's log-prob), so it needs the adapter, not a merged model.

`tasks=` runs lm-evaluation-harness tasks (the optional extra `pip install "qlora[eval]"`) on the
same model object through lm-eval's Hugging Face wrapper.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from qlora.errors import OptionError

log = logging.getLogger("qlora.eval")

METRICS = ("loss", "ppl", "exact_match", "rewards")
FORMATS = {"instruction": "qlora.data.InstructionFormat", "prompt_completion": "qlora.data.PromptCompletionFormat",
           "chat": "qlora.data.ChatFormat", "text": "qlora.data.TextFormat",
           "preference": "qlora.data.PreferenceFormat"}


class EvalError(OptionError):
    """Bad eval input; the message names the argument and the fix."""


# ---- the model -------------------------------------------------------------------------------------

def load_for_eval(path: str | os.PathLike, device: str, base: Optional[str] = None):
    """(model, tokenizer, description, run_config or None) for a run/adapter, merged or quantized directory."""
    from transformers import AutoTokenizer

    import qlora
    from qlora.models.families import from_pretrained

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise EvalError(f"model={path!r} is not a directory; pass a training run, an adapter (with base=), a merged "
                        "model or a 4-bit checkpoint directory")
    config_file = directory / "config.json"
    if config_file.is_file() and not (directory / "adapter_config.json").is_file():
        if base is not None:
            raise EvalError(f"base={base!r} applies to an adapter directory, but {directory} is a full model; drop base=")
        if json.loads(config_file.read_text()).get("quantization_config"):
            model, kind = qlora.load_model(directory, device=device, progress=False), "quantized checkpoint"
        else:
            model, kind = from_pretrained(directory, dtype="auto").to(device), "merged model"
        return model.eval(), AutoTokenizer.from_pretrained(directory), f"{kind} {directory}", None

    from omegaconf import OmegaConf

    from qlora.export import find_adapter_dir, resolve_source
    from qlora.lora import load_lora

    source = resolve_source(find_adapter_dir(directory), base_model=base)
    if source.quantized:
        model = qlora.load_model(source.base, source.qconfig, device=device, dtype=source.dense_dtype,
                                 revision=source.revision, trust_remote_code=source.trust_remote_code, progress=False)
        kind = f"4-bit base {source.base} ({source.qconfig.quant_type})"
    else:
        from qlora.baseline import load_dense_model

        model = load_dense_model(source.base, source.qconfig.compute_dtype, source.dense_dtype, device,
                                 source.qconfig.skip_modules, source.revision, source.trust_remote_code)
        kind = f"16-bit base {source.base}"
    model = load_lora(model, source.adapter_dir)
    has_tokenizer = (source.adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(source.adapter_dir if has_tokenizer else source.base)
    run_cfg = OmegaConf.load(source.run_dir / "config.yaml") if source.run_dir is not None else None
    return model.eval(), tokenizer, f"{kind} + adapter {source.adapter_dir}", run_cfg


# ---- the data ----------------------------------------------------------------------------------------

def _record_format(name: Optional[str], run_cfg):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if name is None:
        if run_cfg is not None:
            return instantiate(run_cfg.data.format)
        name = "instruction"
    target = FORMATS.get(name, name)
    try:
        return instantiate(OmegaConf.create({"_target_": target}))
    except Exception as err:  # hydra wraps import errors in its own types
        raise EvalError(f"format={name!r} is neither one of {list(FORMATS)} nor an importable record format class "
                        f"({err})") from None


def eval_dataset(tokenizer, data: Optional[str], record_format: Optional[str], run_cfg, max_seq_len: Optional[int]):
    """(tokenized examples, description): `data` as a whole, or the run's own held-out split."""
    from qlora.data import PreferenceFormat, prepare_datasets
    from qlora.data.preference import prepare_preference_datasets

    fmt = _record_format(record_format, run_cfg)
    length = max_seq_len or (run_cfg.data.max_seq_len if run_cfg is not None else 512)
    def prepare(tokenizer, completion_only_loss=True, **options):
        if isinstance(fmt, PreferenceFormat):  # pairs: scored by reward accuracy and margin
            return prepare_preference_datasets(tokenizer, **options)
        return prepare_datasets(tokenizer, completion_only_loss=completion_only_loss, **options)
    if data is not None:
        examples, _ = prepare(tokenizer, source=data, format=fmt, max_seq_len=length, eval_fraction=0.0)
        return examples, str(data)
    if run_cfg is None:
        raise EvalError("no data=: pass data=<file or Hub dataset> (a merged or quantized model has no run whose "
                        "held-out set could be used)")
    d = run_cfg.data
    source, eval_source = d.source, d.eval_source
    if source == "embedded":
        from qlora.embedded import TASK_EVAL, TASK_TRAIN

        source, eval_source = str(TASK_TRAIN), str(TASK_EVAL)
    if source == "embedded_preferences":
        from qlora.embedded.preferences import PREFERENCE_EVAL, PREFERENCE_TRAIN

        source, eval_source = str(PREFERENCE_TRAIN), str(PREFERENCE_EVAL)
    _, held_out = prepare(tokenizer, source=source, format=fmt, max_seq_len=length, split=d.split,
                                   eval_source=eval_source, eval_fraction=d.eval_fraction, truncation=d.truncation,
                                   completion_only_loss=d.completion_only_loss, seed=d.seed)
    if held_out is None or not len(held_out):
        raise EvalError("the run has no held-out set (data.eval_fraction=0 and no data.eval_source); pass data=")
    return held_out, f"the run's held-out set ({eval_source or f'{d.eval_fraction:.0%} of {source}'})"


# ---- the metrics ---------------------------------------------------------------------------------------

def parse_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise EvalError(f"metrics={text!r}: unknown {unknown or 'empty list'}; choose from {','.join(METRICS)}")
    return names


def preference_rewards(model, tokenizer, pairs, run_cfg, batch_size: int = 16) -> dict:
    """Reward accuracy and margin of the run's objective on tokenized pairs (TRL's metric names too)."""
    import torch

    from qlora.data.preference import PairCollator
    from qlora.objectives import PreferenceObjective, evaluate_preferences
    from qlora.objectives.objective import peft_model_of

    o = run_cfg.get("objective") if run_cfg is not None else None
    name = o.name if o is not None and o.name in ("orpo", "simpo") else "dpo"  # KTO's reward is DPO's
    objective = PreferenceObjective(name, beta=o.beta if o is not None else 0.1, gamma=o.gamma if o is not None else 0.5)
    if name == "dpo":
        try:
            peft_model_of(model)
        except TypeError:
            raise EvalError("metrics=rewards: the implicit reward compares the model with its base, so pass the run "
                            "or adapter directory rather than a merged model") from None
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, collate_fn=PairCollator(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id))
    batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
    scored = evaluate_preferences(objective, model, batches)
    out = {"reward_accuracy": scored["eval_rewards/accuracies"], "reward_margin": scored["eval_rewards/margins"],
           "reward": f"{name}, beta={objective.beta}", "pairs": scored["eval_pairs"]}
    out.update({k[len("eval_"):]: v for k, v in scored.items() if "/" in k})
    return out


def evaluate(model, tokenizer, examples, metrics: list[str], batch_size: int = 16, max_new_tokens: int = 32,
             progress: bool = True, run_cfg=None) -> dict:
    """{metric: value} on tokenized `examples` (input_ids, labels, prompt, completion; or preference pairs)."""
    import torch
    from tqdm.auto import tqdm

    from qlora.data import Collator
    from qlora.train.evaluation import evaluate_loss, exact_match

    results = {"examples": len(examples)}
    pairs = "chosen_ids" in examples.column_names
    if pairs and {"loss", "ppl"} & set(metrics):
        raise EvalError("metrics=loss/ppl score prompt/completion examples, and the data are preference pairs; "
                        "use metrics=rewards,exact_match")
    if "rewards" in metrics:
        if not pairs:
            raise EvalError("metrics=rewards scores preference pairs; pass format=preference (fields prompt, chosen, "
                            "rejected) or drop rewards from metrics=")
        results.update(preference_rewards(model, tokenizer, examples, run_cfg, batch_size))
    if {"loss", "ppl"} & set(metrics):
        device = next(model.parameters()).device
        loader = torch.utils.data.DataLoader(examples.remove_columns(
            [c for c in examples.column_names if c not in ("input_ids", "labels")]), batch_size=batch_size,
            collate_fn=Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id))
        batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
        scored = evaluate_loss(model, tqdm(batches, total=len(loader), desc="loss", unit="batch", disable=not progress))
        results.update({"loss": scored["eval_loss"], "ppl": scored["eval_ppl"], "tokens": scored["eval_tokens"]})
        results = {k: v for k, v in results.items() if k not in {"loss", "ppl"} - set(metrics)}
    if "exact_match" in metrics:
        rows, bar = [], tqdm(total=len(examples), desc="exact match", unit="example", disable=not progress)
        for start in range(0, len(examples), batch_size):
            chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
            rows += exact_match(model, tokenizer, chunk, max_new_tokens)[1]
            bar.update(len(chunk))
        bar.close()
        results["exact_match"] = sum(r["generated"] == r["reference"] for r in rows) / max(len(rows), 1)
        results["exact_match_examples"] = rows[:20]
    return results


# ---- lm-evaluation-harness --------------------------------------------------------------------------------

def run_lm_eval(model, tokenizer, tasks: list[str], batch_size: int = 8, limit: Optional[int] = None) -> dict:
    """lm-eval's tasks on our model object, through its Hugging Face wrapper (HFLM)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("tasks= needs lm-evaluation-harness, which is not installed: pip install \"qlora[eval]\" "
                        "(or pip install lm-eval)") from None
    manager = TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise EvalError("unknown lm-eval task(s): " + "; ".join(f"{t!r} (close: {', '.join(h) or 'none'})"
                                                               for t, h in hints.items())
                        + "; `lm-eval ls tasks` lists them")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, task_manager=manager, limit=limit)
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        if "connect" in str(err).lower() or "offline" in str(err).lower() or offline:
            raise EvalError(f"lm-eval could not load the data of {', '.join(tasks)}: it is not in the Hugging Face "
                            f"cache and the Hub cannot be reached ({type(err).__name__}: {err}); run once online to "
                            "cache it") from None
        raise
    return {"lm_eval": out["results"], "lm_eval_versions": out.get("versions", {})}


# ---- writing ----------------------------------------------------------------------------------------------

def write_json(path: Path, payload: dict) -> Path:
    """Write through a temporary file and rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    os.replace(staging, path)
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ---- the command ------------------------------------------------------------------------------------------

EVAL_OPTIONS = {
    "run_dir": (None, "a training run directory (outputs/<run>/<date_time>) or a PEFT adapter directory; or use model="),
    "model": (None, "a run or adapter directory, a merged model (qlora export) or a 4-bit checkpoint"),
    "base": (None, "the base checkpoint of a bare adapter directory (default: the run's, or the adapter's own record)"),
    "data": (None, "a .json/.jsonl/.csv/.parquet file or Hub dataset, evaluated whole (default: the run's held-out set)"),
    "format": (None, "record format of data=: instruction | prompt_completion | chat | text | preference | a class "
                     "path (default: the run's format, else instruction)"),
    "metrics": ("auto", "comma-separated from loss,ppl,exact_match,rewards; auto: loss,ppl,exact_match when there is "
                        "data (rewards,exact_match for preference pairs), none with tasks= alone"),
    "tasks": (None, "lm-evaluation-harness tasks, comma-separated (needs pip install \"qlora[eval]\")"),
    "limit": (None, "lm-eval: examples per task at most (for a quick look)"),
    "batch_size": ("16", "examples per batch"),
    "max_new_tokens": ("32", "exact match: tokens generated per prompt at most"),
    "max_seq_len": (None, "truncate examples to this many tokens (default: the run's data.max_seq_len, else 512)"),
    "device": ("auto", "cpu | cuda | auto (cuda when available)"),
    "out": (None, "where eval.json goes (default: inside the run_dir/model directory)"),
    "progress": ("true", "false: no progress bars"),
}


def cmd_eval(values: dict) -> int:
    from qlora.data.loading import check_sources
    from qlora.options import UsageError, as_bool, as_device, as_existing_path, as_number, as_output_file

    target = values["run_dir"] or values["model"]
    if not target or (values["run_dir"] and values["model"]):
        raise UsageError("qlora eval: pass exactly one of run_dir=... or model=...; see `qlora eval --help`")
    progress = as_bool("progress", values["progress"])
    if not progress:
        import datasets

        datasets.disable_progress_bars()  # tokenization and file loading show their own bars
    batch_size = as_number("batch_size", values["batch_size"], int, minimum=1)
    max_new_tokens = as_number("max_new_tokens", values["max_new_tokens"], int, minimum=1)
    max_seq_len = as_number("max_seq_len", values["max_seq_len"], int, minimum=1) if values["max_seq_len"] else None
    limit = as_number("limit", values["limit"], int, minimum=1) if values["limit"] else None
    as_existing_path("run_dir" if values["run_dir"] else "model", target)
    if values["base"]:
        as_existing_path("base", values["base"])
    if values["out"]:
        as_output_file("out", values["out"])
    tasks = [t.strip() for t in (values["tasks"] or "").split(",") if t.strip()]
    device = as_device("device", values["device"])
    check_sources(values.get("data"))  # a missing data file is named before the model loads

    model, tokenizer, described, run_cfg = load_for_eval(target, device, values["base"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as training does: padding is masked out anyway
    has_data = values["data"] is not None or run_cfg is not None
    metrics = (["loss", "ppl", "exact_match"] if has_data and not (tasks and values["data"] is None) else []) \
        if values["metrics"] == "auto" else parse_metrics(values["metrics"])
    if not metrics and not tasks:
        raise EvalError("nothing to evaluate: pass data=<dataset> (or a run_dir) for loss/ppl/exact_match, or tasks=")
    payload = {"model": described, "metrics": {}}
    if metrics:
        examples, data_described = eval_dataset(tokenizer, values["data"], values["format"], run_cfg, max_seq_len)
        if "chosen_ids" in examples.column_names and values["metrics"] == "auto":
            metrics = ["rewards", "exact_match"]  # pairs: the objective's reward instead of loss/perplexity
        payload["data"] = data_described
        payload["metrics"] = evaluate(model, tokenizer, examples, metrics, batch_size, max_new_tokens, progress,
                                      run_cfg)
    if tasks:
        payload.update(run_lm_eval(model, tokenizer, tasks, batch_size=batch_size, limit=limit))
    out = Path(values["out"]).expanduser() if values["out"] else Path(target).expanduser() / "eval.json"
    write_json(out, payload)
    for key in ("loss", "ppl", "exact_match", "reward_accuracy", "reward_margin"):
        if key in payload["metrics"]:
            value = payload["metrics"][key]
            shown = f"{100 * value:.1f}%" if key in ("exact_match", "reward_accuracy") else f"{value:.4f}"
            print(f"{key:<12} {shown}")
    for task, scores in payload.get("lm_eval", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))
        print(f"{task:<12} {shown}")
    print(f"wrote {out}")
    return 0
