"""The `qlora` command: `qlora export ...` and `qlora generate ...`, with key=value arguments.

key=value (not --flags) so that the commands read like the training overrides (`python train.py
lora.r=16`); every key is checked, and an unknown one fails naming the keys that exist.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

# Each command: {key: (default, help)}; a default of None with "required" in the help must be given.
EXPORT_OPTIONS = {
    "run_dir": (None, "required: a training run directory (outputs/<run>/<date_time>) or a PEFT adapter directory"),
    "out": (None, "required: output directory (must be empty or absent unless overwrite=true)"),
    "base": ("dequantized", "dequantized: merge into dequant(NF4(W)), the weights training saw (exact); "
                            "original: merge into the 16-bit W (changes the function by the quantization error)"),
    "original": (None, "path to the 16-bit checkpoint, for base=original when the base is pre-quantized"),
    "format": ("hf", "hf: safetensors + config.json, plain transformers loads it; nf4: re-quantized to NF4 in the "
                     "bitsandbytes layout (the added logit error is measured); gguf: a GGUF file"),
    "gguf_type": ("f16", "GGUF tensor type for format=gguf: f16 | bf16 | q8_0"),
    "dtype": ("bfloat16", "output dtype: bfloat16 | float16 | float32 | auto (the base checkpoint's own dtypes)"),
    "max_shard_size": ("5GB", "largest safetensors shard, e.g. 5GB or 500MB"),
    "overwrite": ("false", "true: replace a non-empty out directory"),
    "progress": ("true", "false: no progress bars"),
}
GENERATE_OPTIONS = {
    "model": (None, "required: a merged directory (export format=hf), a 4-bit directory (format=nf4 or "
                    "qlora.save_model), or a training run / adapter directory (4-bit base + adapter)"),
    "prompt": (None, "required: the text to continue (or the user message, with a chat template)"),
    "max_new_tokens": ("128", "tokens to generate at most"),
    "temperature": ("0.7", "sampling temperature; 0 = greedy"),
    "top_p": ("0.9", "nucleus sampling threshold"),
    "chat": ("auto", "auto: apply the tokenizer's chat template when it has one; true: require it; false: never"),
    "device": ("auto", "cpu | cuda | auto (cuda when available)"),
    "seed": ("0", "random seed for sampling"),
}

USAGE = """usage: qlora <command> key=value ...

commands:
  export     merge a trained LoRA adapter into its base and write it (hf | nf4 | gguf)
  generate   generate text from a merged model, a 4-bit model, or a run (base + adapter)
  doctor     check and time the 4-bit kernels on this machine; writes a report to share

`qlora <command> --help` lists every option of a command. Examples:
  qlora export run_dir=outputs/embedded/2025-01-01_00-00-00 out=merged/
  qlora export run_dir=outputs/run out=merged-nf4/ format=nf4 overwrite=true
  qlora generate model=merged/ prompt="Hello" max_new_tokens=64 temperature=0
"""


class UsageError(Exception):
    pass


def _help(name: str, options: dict) -> str:
    width = max(len(k) for k in options) + 2
    def shown(key, default, text):
        return f"{key}=..." if text.startswith("required") else f"[{key}={'...' if default is None else default}]"

    lines = [f"usage: qlora {name} " + " ".join(shown(k, d, t) for k, (d, t) in options.items()),
             "", "options:"]
    for key, (default, text) in options.items():
        lines.append(f"  {key:<{width}}{text}" + ("" if default is None else f" (default: {default})"))
    return "\n".join(lines)


def parse_options(name: str, args: list[str], options: dict) -> dict:
    values = {k: d for k, (d, _) in options.items()}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UsageError(f"qlora {name}: argument {arg!r} is not key=value; see `qlora {name} --help`")
        key = key.lstrip("-")
        if key not in options:
            raise UsageError(f"qlora {name}: unknown key {key!r}; known keys: {', '.join(options)} "
                             f"(see `qlora {name} --help`)")
        values[key] = value
    missing = [k for k, v in values.items() if v is None and options[k][1].startswith("required")]
    if missing:
        raise UsageError(f"qlora {name}: missing {', '.join(f'{k}=...' for k in missing)}; see `qlora {name} --help`")
    return values


def _bool(key: str, value: str) -> bool:
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UsageError(f"{key}={value!r} must be true or false")


def _number(key: str, value: str, kind: Callable):
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}") from None


def cmd_export(values: dict) -> int:
    from qlora.export import export_merged

    path = export_merged(values["run_dir"], values["out"], base=values["base"], original=values["original"],
                         format=values["format"], dtype=values["dtype"], overwrite=_bool("overwrite", values["overwrite"]),
                         max_shard_size=values["max_shard_size"], progress=_bool("progress", values["progress"]),
                         gguf_type=values["gguf_type"])
    print(f"wrote {path}")
    return 0


def load_for_generation(path: str, device: str):
    """(model, tokenizer) from a merged dir, a 4-bit dir or a run/adapter dir."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qlora

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UsageError(f"model={path!r} is not a directory")
    config_file = directory / "config.json"
    if config_file.is_file():
        if "quantization_config" in json.loads(config_file.read_text()):
            model = qlora.load_model(directory, device=device, progress=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").to(device)
        return model.eval(), AutoTokenizer.from_pretrained(directory)
    from qlora.export import find_adapter_dir, resolve_source
    from qlora.lora import load_lora

    source = resolve_source(find_adapter_dir(directory))
    model = qlora.load_model(source.base, source.qconfig, device=device, dtype=source.dense_dtype,
                             revision=source.revision, trust_remote_code=source.trust_remote_code, progress=False)
    model = load_lora(model, source.adapter_dir)
    has_tokenizer = (source.adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(source.adapter_dir if has_tokenizer else source.base)
    return model.eval(), tokenizer


def cmd_generate(values: dict) -> int:
    import torch
    from transformers import TextStreamer

    max_new_tokens = _number("max_new_tokens", values["max_new_tokens"], int)
    temperature = _number("temperature", values["temperature"], float)
    top_p = _number("top_p", values["top_p"], float)
    seed = _number("seed", values["seed"], int)
    chat = values["chat"].lower()
    if chat not in ("auto", "true", "false"):
        raise UsageError(f"chat={values['chat']!r} must be auto, true or false")
    device = values["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    model, tokenizer = load_for_generation(values["model"], device)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "true" and not has_template:
        raise UsageError("chat=true, but the tokenizer has no chat template; use chat=false or chat=auto")
    if has_template and chat != "false":
        text = tokenizer.apply_chat_template([{"role": "user", "content": values["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(values["prompt"], return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad, **sampling)
    seconds = time.perf_counter() - started
    new_tokens = output.shape[-1] - inputs["input_ids"].shape[-1]
    print(f"\n[{new_tokens} tokens in {seconds:.2f} s: {new_tokens / max(seconds, 1e-9):.1f} tokens/s]", flush=True)
    return 0


DOCTOR_OPTIONS = {
    "out": (None, "report path (default benchmarks/results/doctor-<gpu or cpu>.json)"),
}


def cmd_doctor(values: dict) -> int:
    from qlora.doctor import doctor  # the kernel checks and timings live there

    return doctor(values["out"])


COMMANDS = {"export": (EXPORT_OPTIONS, cmd_export), "generate": (GENERATE_OPTIONS, cmd_generate)}
COMMANDS["doctor"] = (DOCTOR_OPTIONS, cmd_doctor)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n" + "\n\n".join(_help(n, o) for n, (o, _) in COMMANDS.items()))
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qlora: unknown command {name!r}; commands: {', '.join(COMMANDS)} (see `qlora --help`)", file=sys.stderr)
        return 2
    options, command = COMMANDS[name]
    if any(a in ("-h", "--help", "help") for a in args):
        print(_help(name, options))
        return 0
    try:
        return command(parse_options(name, args, options))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
