"""`qlora quantize`: quantize a dense checkpoint with GPTQ (calibrated) and save it in the GPTQ v1
layout that transformers + optimum/GPTQModel load, and qlora.load_model too.

    qlora quantize model=PATH method=gptq bits=4 group_size=128 dataset=wikitext2 output_dir=DIR
"""
from __future__ import annotations

# {key: (default, help)}, the form of every command's options table (qlora/cli.py, qlora/evaluate.py):
# parsed and checked by qlora.options, listed by `qlora quantize --help`.
QUANTIZE_OPTIONS = {
    "model": (None, "required: a dense checkpoint directory, a Hub repo id, or 'embedded'"),
    "output_dir": (None, "required: output directory (must be empty or absent unless overwrite=true)"),
    "method": ("gptq", "quantization method: gptq"),
    "bits": ("4", "2 | 3 | 4 | 8"),
    "group_size": ("128", "input channels per scale/zero group; -1: one group per row"),
    "dataset": (None, "required: calibration text: a local .txt/.jsonl file, a Hub dataset (wikitext2, c4), or "
                      "'embedded' (the embedded model's corpus)"),
    "desc_act": ("false", "true: act-order (columns by decreasing Hessian diagonal)"),
    "static_groups": ("false", "true: group parameters fixed before act-order reorders columns"),
    "sym": ("true", "false: asymmetric groups (a zero point per group)"),
    "true_sequential": ("true", "quantize a block's sublayers in order, each seeing the earlier ones quantized"),
    "damp_percent": ("0.1", "Hessian dampening, a fraction of its mean diagonal"),
    "model_seqlen": ("auto", "tokens per calibration sample (auto: min(2048, the model's context))"),
    "samples": ("128", "calibration samples at most"),
    "device": ("auto", "cpu | cuda | auto (cuda when available)"),
    "overwrite": ("false", "true: replace a non-empty out directory"),
    "progress": ("true", "false: no progress bars"),
}
METHODS = ("gptq",)


def cmd_quantize(values: dict) -> int:
    from pathlib import Path

    from qlora.export import check_output_dir
    from qlora.options import UsageError, as_bool, as_device, as_existing_path, as_number

    import qlora
    from qlora.embedded import corpus
    from qlora.quant.gptq.config import GPTQQuantConfig

    if values["method"] not in METHODS:
        raise UsageError(f"method={values['method']!r} is not supported; methods: {', '.join(METHODS)} (NF4/FP4 need no "
                         "separate step: qlora.load_model quantizes while loading)")
    model = as_existing_path("model", values["model"])
    overwrite = as_bool("overwrite", values["overwrite"])
    check_output_dir(Path(values["output_dir"]).expanduser(), overwrite, "output_dir", "overwrite=true")
    if model == "embedded":
        from qlora.embedded import BASE_MODEL_DIR

        model = str(BASE_MODEL_DIR)
    dataset = values["dataset"] if values["dataset"] == "embedded" else as_existing_path("dataset", values["dataset"])
    if dataset == "embedded":
        dataset = corpus.calibration_texts()
    seqlen = None if values["model_seqlen"] == "auto" else as_number("model_seqlen", values["model_seqlen"], int)
    config = GPTQQuantConfig(
        bits=as_number("bits", values["bits"], int), group_size=as_number("group_size", values["group_size"], int),
        desc_act=as_bool("desc_act", values["desc_act"]), static_groups=as_bool("static_groups", values["static_groups"]),
        sym=as_bool("sym", values["sym"]), true_sequential=as_bool("true_sequential", values["true_sequential"]),
        damp_percent=as_number("damp_percent", values["damp_percent"], float), dataset=dataset, model_seqlen=seqlen,
        max_calibration_samples=as_number("samples", values["samples"], int, minimum=1))
    device = as_device("device", values["device"])
    quantized = qlora.load_model(model, quantization_config=config, device=device,
                                 progress=as_bool("progress", values["progress"]))
    path = qlora.save_model(quantized, values["output_dir"], overwrite=overwrite)
    print(f"wrote {path} (GPTQ {config.bits}-bit, group_size {config.group_size}"
          f"{', act-order' if config.desc_act else ''}, checkpoint_format gptq)")
    return 0
