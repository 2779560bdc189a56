"""The `qlora` command: `qlora export ...` and `qlora generate ...`, with key=value arguments.

key=value (not --flags) so that the commands read like the training overrides (`python train.py
lora.r=16`); every key is checked, and an unknown one fails naming the keys that exist.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

from qlora.errors import UserError, report
from qlora.kernels.backend import BackendError
from qlora.options import (UsageError, as_bool, as_choice, as_device, as_existing_path, as_number, as_output_file,
                           help_text, parse_options)
from qlora.quantize_cli import QUANTIZE_OPTIONS, cmd_quantize

# Each command: {key: (default, help)}; a default of None with "required" in the help must be given.
# Former key names: still accepted, with a deprecation warning.
RENAMED_KEYS = {"export": {"out": "output_dir"}, "quantize": {"out": "output_dir"}}
EXPORT_OPTIONS = {
    "run_dir": (None, "required: a training run directory (outputs/<run>/<date_time>) or a PEFT adapter directory"),
    "output_dir": (None, "required: output directory (must be empty or absent unless overwrite=true)"),
    "base": ("dequantized", "dequantized: merge into dequant(NF4(W)), the weights training saw (exact); "
                            "original: merge into the 16-bit W (changes the function by the quantization error)"),
    "original": (None, "path to the 16-bit checkpoint, for base=original when the base is pre-quantized"),
    "format": ("hf", "hf: safetensors + config.json, plain transformers loads it; nf4: re-quantized to NF4 in the "
                     "bitsandbytes layout (the added logit error is measured); int8: the same in LLM.int8; "
                     "gguf: a GGUF file"),
    "gguf_type": ("f16", "GGUF tensor type for format=gguf: f16 | bf16 | q8_0"),
    "dtype": ("bfloat16", "output dtype: bfloat16 | float16 | float32 | auto (the base checkpoint's own dtypes)"),
    "max_shard_size": ("5GB", "largest safetensors shard, e.g. 5GB or 500MB"),
    "overwrite": ("false", "true: replace a non-empty out directory"),
    "progress": ("true", "false: no progress bars"),
    "push_to_hub": (None, "a Hub repo id <user>/<name>: upload the written directory there (HF_ENDPOINT and HF_TOKEN "
                          "apply)"),
}
GENERATE_OPTIONS = {
    "model": (None, "required: a merged directory (export format=hf), a 4-bit directory (format=nf4 or "
                    "qlora.save_model), or a training run / adapter directory (4-bit base + adapter)"),
    "prompt": (None, "required: the text to continue (or the user message, with a chat template)"),
    "max_new_tokens": ("128", "tokens to generate at most"),
    "temperature": ("0.7", "sampling temperature; 0 = greedy"),
    "top_p": ("0.9", "nucleus sampling threshold"),
    "chat": ("auto", "auto: format the prompt as the run's training data was (recorded with the adapter and in "
                     "exports), else with the tokenizer's chat template when it has one; true: the chat template; "
                     "false: the prompt as it is"),
    "device": ("auto", "cpu | cuda | auto (cuda when available)"),
    "seed": ("0", "random seed for sampling"),
}

USAGE = """usage: qlora <command> key=value ...

commands:
  train      fine-tune: `qlora train <overrides>` is `python train.py <overrides>` (Hydra; --help lists groups)
  export     merge a trained LoRA adapter into its base and write it (hf | nf4 | int8 | gguf)
  generate   generate text from a merged model, a 4-bit model, or a run (base + adapter)
  eval       held-out loss, perplexity and exact match (eval.json); lm-eval tasks with tasks=
  quantize   GPTQ-quantize a dense model with calibration text and save it (GPTQ v1 layout)
  doctor     check and time the kernels on this machine (4-bit, int8, GPTQ, 8-bit AdamW); writes a report

`qlora <command> --help` lists every option of a command. Examples:
  qlora train recipe=llama7b_nf4 lora.r=16 trainer.max_steps=500
  qlora export run_dir=outputs/embedded/2025-01-01_00-00-00 output_dir=merged/
  qlora export run_dir=outputs/run output_dir=merged-nf4/ format=nf4 overwrite=true
  qlora export run_dir=outputs/run output_dir=merged-int8/ format=int8 push_to_hub=me/model-int8
  qlora generate model=merged/ prompt="Hello" max_new_tokens=64 temperature=0
  qlora eval run_dir=outputs/embedded/2025-01-01_00-00-00
  qlora quantize model=embedded method=gptq bits=4 group_size=128 dataset=embedded output_dir=gptq4/

An error caused by input prints one line, `error: ...`; QLORA_DEBUG=1 adds the traceback.
"""


def _command_from(module: str, options: str, function: str) -> tuple[dict, Callable]:
    """A command defined in its own module (which imports torch and the rest only when it runs)."""
    import importlib

    loaded = importlib.import_module(module)
    return getattr(loaded, options), getattr(loaded, function)


def cmd_export(values: dict) -> int:
    from qlora.export import BASES, FORMATS, GGUF_TYPES, check_output_dir, export_merged
    from qlora.export.merge import DTYPES
    from qlora.models.saving import parse_size

    fmt = as_choice("format", values["format"], FORMATS)
    base = as_choice("base", values["base"], BASES)
    as_choice("gguf_type", values["gguf_type"], GGUF_TYPES)
    as_choice("dtype", values["dtype"], list(DTYPES))
    overwrite = as_bool("overwrite", values["overwrite"])
    output_dir = Path(values["output_dir"]).expanduser()
    check_output_dir(output_dir, overwrite, "output_dir", "overwrite=true")  # spelled as on this command line
    as_existing_path("run_dir", values["run_dir"])
    if values["original"]:
        as_existing_path("original", values["original"])
    try:
        parse_size(values["max_shard_size"])
    except ValueError:
        raise UsageError(f"max_shard_size={values['max_shard_size']!r} must be bytes or a size like 5GB or 500MB") from None
    repo = values["push_to_hub"]
    if repo is not None and (repo.count("/") != 1 or not all(repo.split("/")) or " " in repo):
        raise UsageError(f"push_to_hub={repo!r} must be a Hub repo id '<user or organisation>/<name>'")
    path = export_merged(values["run_dir"], output_dir, base=base, original=values["original"], format=fmt,
                         dtype=values["dtype"], overwrite=overwrite, max_shard_size=values["max_shard_size"],
                         progress=as_bool("progress", values["progress"]), gguf_type=values["gguf_type"])
    print(f"wrote {path}")
    if values["push_to_hub"]:
        from qlora.hub import push_to_hub

        print(f"pushed to {values['push_to_hub']}: {push_to_hub(path, values['push_to_hub'])}")
    return 0


def load_for_generation(path: str, device: str):
    """(model, tokenizer, prompt format or None) from a merged dir, a 4-bit dir or a run/adapter dir."""
    import json

    from transformers import AutoTokenizer

    import qlora
    from qlora.data.formats import load_prompt_format
    from qlora.errors import DamagedFileError
    from qlora.models.families import from_pretrained

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UsageError(f"model={path!r} is not a directory")
    config_file = directory / "config.json"
    if config_file.is_file():
        try:
            if "quantization_config" in json.loads(config_file.read_text()):
                model = qlora.load_model(directory, device=device, progress=False)
            else:
                model = from_pretrained(directory, dtype="auto").to(device)
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError, NotImplementedError) as err:
            if isinstance(err, UserError):
                raise
            raise DamagedFileError(f"model={path}: could not load it ({type(err).__name__}: {err})") from err
        return model.eval(), tokenizer, load_prompt_format(directory)
    from qlora.export import resolve_source
    from qlora.lora import load_lora

    source = resolve_source(directory, option="model")
    try:
        model = qlora.load_model(source.base, source.qconfig, device=device, dtype=source.dense_dtype,
                                 revision=source.revision, trust_remote_code=source.trust_remote_code, progress=False)
        model = load_lora(model, source.adapter_dir)
        has_tokenizer = (source.adapter_dir / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(source.adapter_dir if has_tokenizer else source.base)
    except (OSError, ValueError, NotImplementedError) as err:
        if isinstance(err, UserError):
            raise
        raise DamagedFileError(f"model={path}: could not load the base {source.base} with its adapter "
                               f"({type(err).__name__}: {err})") from err
    return model.eval(), tokenizer, load_prompt_format(source.adapter_dir)


def generation_prompt(tokenizer, prompt_format, prompt: str, chat: str) -> tuple[str, bool]:
    """(text to tokenize, whether the tokenizer adds its special tokens) for `prompt` under `chat`."""
    if chat == "auto" and prompt_format is not None:
        # The run's own data format: an instruction-tuned run is asked in its instruction template.
        return prompt_format.prompt_for(prompt, tokenizer), True
    if getattr(tokenizer, "chat_template", None) and chat != "false":
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, False  # the template writes the special tokens itself
    return prompt, True


def cmd_generate(values: dict) -> int:
    import torch
    from transformers import TextStreamer

    max_new_tokens = as_number("max_new_tokens", values["max_new_tokens"], int, minimum=0, low_open=True)
    temperature = as_number("temperature", values["temperature"], float, minimum=0)
    top_p = as_number("top_p", values["top_p"], float, minimum=0, maximum=1, low_open=True)
    seed = as_number("seed", values["seed"], int, minimum=0)
    chat = values["chat"].lower()
    if chat not in ("auto", "true", "false"):
        raise UsageError(f"chat={values['chat']!r} must be auto, true or false")
    device = as_device("device", values["device"])

    from qlora.nn.experts_interface import generation_options

    model, tokenizer, prompt_format = load_for_generation(values["model"], device)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "true" and not has_template:
        raise UsageError("chat=true, but the tokenizer has no chat template; use chat=false or chat=auto")
    text, special = generation_prompt(tokenizer, prompt_format, values["prompt"], chat)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=special)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad, **sampling,
                                **generation_options(model))
    seconds = time.perf_counter() - started
    new_tokens = output.shape[-1] - inputs["input_ids"].shape[-1]
    print(f"\n[{new_tokens} tokens in {seconds:.2f} s: {new_tokens / max(seconds, 1e-9):.1f} tokens/s]", flush=True)
    return 0


DOCTOR_OPTIONS = {
    "out": (None, "report path (default benchmarks/results/doctor-<gpu or cpu>.json)"),
}


def cmd_doctor(values: dict) -> int:
    from qlora.doctor import doctor  # the kernel checks and timings live there

    return doctor(as_output_file("out", values["out"]) if values["out"] else None)


COMMANDS = {"export": (EXPORT_OPTIONS, cmd_export), "generate": (GENERATE_OPTIONS, cmd_generate),
            "quantize": (QUANTIZE_OPTIONS, cmd_quantize)}
COMMANDS["eval"] = _command_from("qlora.evaluate", "EVAL_OPTIONS", "cmd_eval")
COMMANDS["doctor"] = (DOCTOR_OPTIONS, cmd_doctor)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n" + "\n\n".join(help_text(n, o) for n, (o, _) in COMMANDS.items()))
        return 0
    name, args = argv[0], argv[1:]
    if name == "train":  # Hydra overrides, not key=value options: Hydra parses them (and its --help)
        from qlora.train.command import main as train

        train(args)
        return 0
    if name not in COMMANDS:
        print(f"qlora: unknown command {name!r}; commands: {', '.join(COMMANDS)} (see `qlora --help`)", file=sys.stderr)
        return 2
    options, command = COMMANDS[name]
    if any(a in ("-h", "--help", "help") for a in args):
        print(help_text(name, options))
        return 0
    try:
        return command(parse_options(name, args, options, RENAMED_KEYS.get(name)))
    except (UserError, BackendError) as err:
        # Input the user can fix from the message alone: one line (QLORA_DEBUG=1 adds the traceback).
        report(err)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print(f"qlora {name}: interrupted; nothing was written in place of the output", file=sys.stderr)
        return 130


def console() -> None:
    """The `qlora` console script: main(), then an exit without the interpreter's teardown (fast_exit)."""
    from qlora.fast_exit import exit_process

    exit_process(main())


if __name__ == "__main__":
    console()
