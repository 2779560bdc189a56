"""Export a trained adapter merged into its base: plain HF safetensors, NF4 or LLM.int8 (bitsandbytes
layouts), or GGUF.

    from qlora.export import export_merged
    export_merged("outputs/run/2025-01-01_00-00-00", "merged/")                  # bf16 HF checkpoint
    export_merged(run, "merged-nf4/", format="nf4")                              # 4-bit again, error reported
    export_merged(run, "merged-int8/", format="int8")                            # LLM.int8, error reported
    export_merged(run, "merged-orig/", base="original", original="path/16bit")  # into W instead

Everything is written into a temporary sibling directory and renamed into place at the end, so
a failed export leaves nothing behind and never half-replaces an existing one.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from qlora.quant.nf4.config import QuantConfig
from qlora.data.formats import PROMPT_FORMAT_FILE
from qlora.errors import OptionError, OutputExistsError
from qlora.export.merge import BASES, AdapterMismatchError, merge_to_hf_dir, parse_dtype_option, read_merge_record
from qlora.export.experts import refuse_requantized_experts
from qlora.export.source import AdapterSource, find_adapter_dir, resolve_source
from qlora.staging import make_staging_dir, staged_directory

FORMATS = ("hf", "nf4", "int8", "gguf")
GGUF_TYPES = ("f16", "bf16", "q8_0")

__all__ = ["AdapterMismatchError", "AdapterSource", "FORMATS", "GGUF_TYPES", "export_merged", "find_adapter_dir",
           "merge_to_hf_dir", "read_merge_record", "resolve_source"]


def export_merged(
    run_or_adapter_dir: str | Path,
    output_dir: str | Path | None = None,
    base: str = "dequantized",
    original: Optional[str | Path] = None,
    format: str = "hf",  # noqa: A002 (the CLI's key name)
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    gguf_type: str = "f16",
    out_dir: str | Path | None = None,
) -> Path:
    """Merge the adapter of a run (or an adapter directory) into its base and write it to `output_dir`.

    base: "dequantized" (default) merges into dequant(NF4(W)), the weights training saw;
        "original" into the 16-bit W (needs `original=<16-bit checkpoint>` if the base is pre-quantized).
    format: "hf" (safetensors + config without quantization_config), "nf4" (the merged weights
        re-quantized, bitsandbytes layout; the logit error this adds is measured and recorded), "int8"
        (the same, re-quantized to LLM.int8 with the base's threshold, or 6.0) or
        "gguf" (through qlora.export.gguf.write_gguf, `gguf_type` f16 | bf16 | q8_0).
    dtype: bfloat16 | float16 | float32 | auto (each tensor keeps the base checkpoint's dtype).
    out_dir: the former name of `output_dir`; still accepted, with a deprecation warning.
    """
    output_dir = deprecated_alias(output_dir, out_dir, "output_dir", "out_dir", "export_merged")
    if format not in FORMATS:
        raise OptionError(f"format={format!r} is not one of {list(FORMATS)}")
    if base not in BASES:
        raise OptionError(f"base={base!r} is not one of {list(BASES)}")
    if format == "gguf" and gguf_type not in GGUF_TYPES:
        raise OptionError(f"gguf_type={gguf_type!r} is not one of {list(GGUF_TYPES)}")
    parse_dtype_option(dtype)
    output_dir = Path(output_dir).expanduser()
    check_output_dir(output_dir, overwrite, "output_dir", "overwrite=True")
    source = resolve_source(run_or_adapter_dir)
    if format in ("nf4", "int8"):
        refuse_requantized_experts(source, format)

    with staged_directory(output_dir) as staging:
        if format == "hf":
            record = merge_to_hf_dir(source, staging, base, _str(original), dtype, max_shard_size, progress)
        else:
            record = _export_via_dense(source, staging, output_dir, base, _str(original), format, dtype,
                                       max_shard_size, progress, gguf_type)
        (staging / "README.md").write_text(_readme(record, format, gguf_type))
        if format != "gguf" and (source.adapter_dir / PROMPT_FORMAT_FILE).is_file():
            # generate formats prompts of the merged model as the run trained, like it does for the run itself.
            shutil.copy2(source.adapter_dir / PROMPT_FORMAT_FILE, staging / PROMPT_FORMAT_FILE)
    if progress:
        print(f"merged {record['merged_modules']} adapted modules into the {record['base']} base -> {output_dir}")
        if f"{format}_added_logit_error" in record:
            err = record[f"{format}_added_logit_error"]
            print(f"{format} re-quantization adds a logit error of max {err['max_abs']:.4g}, mean {err['mean_abs']:.4g} "
                  f"(logit std {err['reference_logit_std']:.4g}, top-1 agreement {err['top1_agreement']:.1%})")
            print(f"  top-1 agreement: the share of positions where the re-quantized model's most likely next token is "
                  "the merged model's. For scale: NF4 on the embedded 6.9M-parameter model gives about 92%; a mean "
                  "error above the logit std, or agreement near chance, means the merge or the base is wrong.")
    return output_dir


def deprecated_alias(value, old_value, name: str, old_name: str, where: str):
    """`value`, or `old_value` given under the former name (with a FutureWarning); one of them is required."""
    if old_value is not None:
        warnings.warn(f"{where}: {old_name}= is deprecated; use {name}=", FutureWarning, stacklevel=3)
        if value is not None and Path(value) != Path(old_value):
            raise OptionError(f"{where}: both {name}={value} and {old_name}={old_value} given; pass {name}= only")
        value = old_value
    if value is None:
        raise OptionError(f"{where}: {name}= is required")
    return value


def check_output_dir(output_dir: Path, overwrite: bool, option: str, overwrite_spelling: str) -> None:
    """A file, or a non-empty folder without `overwrite`, is refused naming the option as the caller spells it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"{option}={output_dir} exists and is not a directory; choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{option}={output_dir} is not empty; pass {overwrite_spelling} to replace it, "
                                "or choose another directory")


def _str(path) -> Optional[str]:
    return None if path is None else str(path)


def _export_via_dense(source, staging, output_dir, base, original, format, dtype, max_shard_size, progress, gguf_type):
    """Merge into a temporary dense checkpoint beside the staging folder, then convert it. It is named
    like a staging folder, so what a killed export leaves is removed by the next write to the same place."""
    work = make_staging_dir(output_dir)
    try:
        # GGUF conversion rounds once, from fp32; NF4 quantizes the merged 16-bit model the report compares with.
        dense_dtype = "float32" if format == "gguf" else dtype
        record = merge_to_hf_dir(source, work, base, original, dense_dtype, max_shard_size, progress)
        if format == "gguf":
            try:
                from qlora.export.gguf import write_gguf
            except ImportError as err:
                raise RuntimeError(f"format='gguf' needs qlora.export.gguf.write_gguf, which could not be imported "
                                   f"({err}); export format='hf' and convert with llama.cpp's "
                                   "convert_hf_to_gguf.py instead") from err
            path = write_gguf(work, staging / f"model-{gguf_type}.gguf", gguf_type=gguf_type, name=output_dir.name)
            record.update(format="gguf", gguf_type=gguf_type, gguf_file=Path(path).name)
            (staging / "qlora_merge.json").write_text(json.dumps(record, indent=2) + "\n")
        else:
            from qlora.export.nf4 import added_logit_error, write_nf4

            qconfig = _requantization_config(record["quantization"], format, source.qconfig.compute_dtype)
            dense = parse_dtype_option(dtype) or source.dense_dtype or torch.bfloat16
            write_nf4(work, staging, qconfig, dense, progress)
            record.update({"format": format, f"{format}_added_logit_error": added_logit_error(work, staging)})
            if format == "int8":
                record["requantized_threshold"] = qconfig.threshold
            _update_config_record(staging, record)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _requantization_config(q: dict, format: str, compute_dtype):
    """How format="nf4" / "int8" re-quantize the merge: the base's own settings when it was in that
    format (NF4 double quant and blocksize; the int8 threshold), else the format's defaults."""
    if format == "int8":
        from qlora.quant.int8.config import Int8Config

        threshold = q.get("quantization_config", {}).get("llm_int8_threshold", 6.0) if q["format"] == "int8" else 6.0
        return Int8Config(threshold=threshold, skip_modules=q["skip_modules"], compute_dtype=compute_dtype)
    if "quant_type" not in q:
        return QuantConfig(skip_modules=q["skip_modules"], compute_dtype=compute_dtype)
    return QuantConfig(quant_type=q["quant_type"], double_quant=q["double_quant"], blocksize=q["blocksize"],
                       skip_modules=q["skip_modules"], compute_dtype=compute_dtype)


def _update_config_record(directory: Path, record: dict) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["qlora_merge"] = record
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


_FORMAT_NAMES = {"nf4": "NF4", "fp4": "FP4", "int8": "int8"}


def _readme(record: dict, format: str, gguf_type: str) -> str:
    q = record["quantization"]
    layout = (f"{q['quant_type']}, double quant {q['double_quant']}, blocksize {q['blocksize']}"
              if "quant_type" in q else f"format {q['format']} ({q['quantization_config']})")
    quant = f"{layout}, dense modules {q['skip_modules']} (from the {record['quantization_from']})"
    base_format = _FORMAT_NAMES.get(q["format"], q["format"])
    bits = "8-bit" if q["format"] == "int8" else "4-bit"
    if not record.get("trained_on_quantized_base", True):
        how = ("The adapter was trained with `quantization=none`, on the base's own 16-bit weights W, and was "
               f"merged into them (from `{record['weights_from']}`): this model computes what the trained model "
               "computed, up to the output dtype's rounding.")
    elif record["base"] == "dequantized":
        how = (f"The adapter was merged into **dequant({base_format}(W))**, the base weights exactly as training saw "
               "them: " + (f"the {bits} tensors of the pre-quantized base were decoded in fp32"
                           if record["base_prequantized"] else
                           "each original tensor was re-quantized with the run's settings (bit-exact with training) "
                           "and decoded in fp32") + f". Quantization: {quant}. This model computes what the {bits} "
               "model with the adapter computed, up to the output dtype's rounding.")
    else:
        how = ("The adapter was merged into the **original 16-bit weights** W (from "
               f"`{record['weights_from']}`), not into the {bits} weights it was trained against: the result "
               f"differs from the trained {bits} model + adapter by the base's quantization error.")
    lora = record["lora"]
    lines = [
        "# Merged QLoRA model", "",
        f"Written by `qlora export` (format `{format}`).", "",
        f"- base model: `{record['base_model']}`", f"- adapter: `{record['adapter']}`",
        f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, rsLoRA={lora['use_rslora']}, DoRA={lora['use_dora']}; "
        f"{record['merged_modules']} modules merged in fp32 with PEFT's own merge (W' = W + delta)"
        + (f", {record['merged_expert_stacks']} of them expert stacks (PEFT's ParamWrapper layout, merged expert by "
           "expert)" if record.get("merged_expert_stacks") else ""),
        f"- output dtype: {record['dtype']}", "", how, "",
    ]
    if format in ("nf4", "int8"):
        err = record[f"{format}_added_logit_error"]
        target = "NF4" if format == "nf4" else f"LLM.int8 (threshold {record['requantized_threshold']})"
        lines += [
            f"The merged weights were then **re-quantized** to {target} (bitsandbytes layout; loads in "
            "qlora.load_model and in transformers + bitsandbytes). That adds a second rounding error; measured in "
            f"fp32 against the merged 16-bit model on {err['sequences']} fixed sequences of {err['sequence_length']} "
            f"tokens: max |logit diff| {err['max_abs']:.4g}, mean {err['mean_abs']:.4g} (reference logit std "
            f"{err['reference_logit_std']:.4g}; top-1 token agreement {err['top1_agreement']:.1%}).", "",
        ]
    if format == "gguf":
        lines += [f"Converted to GGUF ({gguf_type}) from an fp32 merge: `{record['gguf_file']}`.", ""]
    lines += ["The full record is `qlora_merge` in " + ("qlora_merge.json." if format == "gguf" else "config.json."), ""]
    return "\n".join(lines)
