"""A GPTQ base for training: the checkpoint itself when it already is GPTQ, else the dense model
quantized once (with calibration) into a cache directory keyed by the model and every option that
changes the result, and reused by later runs and by `qlora export`.

Recipe keys (`quantization.method: gptq`, `quantization.gptq: {...}`): bits, group_size, desc_act,
sym, static_groups, true_sequential, damp_percent, dataset ('embedded', a local file, or a Hub
name), samples, model_seqlen, cache_dir (default ~/.cache/qlora/gptq or $QLORA_GPTQ_CACHE).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from qlora.errors import OptionError

logger = logging.getLogger(__name__)
DEFAULTS = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "static_groups": False,
            "true_sequential": True, "damp_percent": 0.1, "dataset": "embedded", "samples": 128, "model_seqlen": None,
            "cache_dir": None}


def gptq_options(options: Mapping[str, Any] | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise OptionError(f"quantization.gptq has unknown keys {unknown}; known keys: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **options}


def is_gptq_checkpoint(directory: Path) -> bool:
    from qlora.quant.gptq.config import QUANTIZE_CONFIG_NAME

    config = directory / "config.json"
    saved = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if saved:
        return str(saved.get("quant_method", "")).lower() == "gptq"
    return (directory / QUANTIZE_CONFIG_NAME).is_file()


def cache_path(model_path: str, options: dict) -> Path:
    key_fields = {k: v for k, v in options.items() if k != "cache_dir"}
    key = hashlib.sha256(json.dumps([str(model_path), key_fields], sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = Path(options["cache_dir"] or os.environ.get("QLORA_GPTQ_CACHE") or Path.home() / ".cache" / "qlora" / "gptq")
    return root.expanduser() / f"{Path(str(model_path)).name}-gptq{options['bits']}-{key}"


def gptq_base(model_path: str, options: Mapping[str, Any] | None, device=None, create: bool = True) -> str:
    """The GPTQ checkpoint to train on (see the module docstring); quantizes into the cache on first use."""
    from qlora.models.checkpoint import resolve_checkpoint

    options = gptq_options(options)
    directory = resolve_checkpoint(model_path)
    if is_gptq_checkpoint(directory):
        return str(directory)
    cached = cache_path(model_path, options)
    if (cached / "config.json").is_file():
        logger.info("GPTQ base from the cache: %s", cached)
        return str(cached)
    if not create:
        raise FileNotFoundError(f"the run trained on a GPTQ base quantized from {model_path}, cached at {cached}, which "
                                "no longer exists; re-create it by starting the run's recipe again (or pass the GPTQ "
                                "checkpoint as the base)")
    import qlora
    from qlora.quant.gptq.config import GPTQQuantConfig
    from qlora.embedded import corpus

    dataset = corpus.calibration_texts() if options["dataset"] == "embedded" else options["dataset"]
    config = GPTQQuantConfig(bits=options["bits"], group_size=options["group_size"], desc_act=options["desc_act"],
                             sym=options["sym"], static_groups=options["static_groups"],
                             true_sequential=options["true_sequential"], damp_percent=options["damp_percent"],
                             dataset=dataset, model_seqlen=options["model_seqlen"],
                             max_calibration_samples=options["samples"])
    logger.info("quantizing %s with GPTQ (%d-bit, group_size %d) into %s", model_path, config.bits, config.group_size, cached)
    model = qlora.load_model(directory, quantization_config=config, device=device)
    cached.parent.mkdir(parents=True, exist_ok=True)
    qlora.save_model(model, cached)  # staged: an interrupted run leaves no half-written cache entry
    return str(cached)
