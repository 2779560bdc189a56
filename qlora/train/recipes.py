"""Compose a recipe from Python (notebooks, scripts, tests) exactly as train.py does, and turn its
values into library objects (`model_path`, `quant_config`, `dense_dtype`: used by training and export)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from omegaconf import DictConfig

import qlora.recipes
from qlora.train.schema import register
from qlora.train.recipe_checks import validate

if TYPE_CHECKING:
    import torch

    from qlora.quant.nf4.config import QuantConfig

# The repository's recipes/, installed as the package qlora.recipes (an editable install keeps it in place).
RECIPES_DIR = Path(qlora.recipes.__file__).resolve().parent


def compose_recipe(overrides: Iterable[str] = (), recipes_dir: Optional[Path] = None) -> DictConfig:
    """The validated config `python train.py <overrides>` would run with."""
    from hydra import compose, initialize_config_dir

    directory = Path(recipes_dir or RECIPES_DIR)
    if not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"no recipes at {directory}; pass recipes_dir=<the repository's recipes/ folder>")
    register()
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate(cfg)
    return cfg


# ---- the recipe -> library bridge: the one place train and export turn recipe values into objects ----
def model_path(name_or_path: str) -> str:
    """`model.name_or_path` as qlora.load_model takes it: "embedded" is the model shipped in the package,
    "embedded_moe" the same model upcycled into a mixture of experts."""
    if name_or_path in ("embedded", "embedded_moe"):
        from qlora.embedded import BASE_MODEL_DIR, MOE_MODEL_DIR

        return str(BASE_MODEL_DIR if name_or_path == "embedded" else MOE_MODEL_DIR)
    return name_or_path


def native_compute_dtype(device: str) -> tuple[str, str]:
    """What quantization.compute_dtype=auto means on `device` ("cpu", "cuda", "cuda:N"): (dtype name,
    why). bfloat16 where the device multiplies bf16 natively: a CUDA GPU of compute capability 8.0+,
    a CPU with AVX512-BF16 or AMX, where oneDNN's bf16 matmuls run about twice as fast as fp32
    (measured 2.1-2.5x on the embedded model's shapes, AMD EPYC with AVX512-BF16, one thread).
    float32 elsewhere: without those units bf16 is converted to fp32 in every product and is no faster."""
    import torch

    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", "this GPU computes bf16 natively"
        return "float32", "this GPU has no native bf16"
    cpu = getattr(torch, "cpu", None)
    for probe, unit in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        check = getattr(cpu, probe, None)
        if callable(check) and check():
            return "bfloat16", f"this CPU has {unit}"
    return "float32", "this CPU has neither AVX512-BF16 nor AMX"


def resolve_compute_dtype(cfg: DictConfig, device: str) -> Optional[str]:
    """Replace quantization.compute_dtype=auto in `cfg` by the dtype native_compute_dtype gives for
    `device`; returns the log line saying so, or None when the recipe named a dtype itself."""
    if cfg.quantization.compute_dtype != "auto":
        return None
    dtype, why = native_compute_dtype(device)
    cfg.quantization.compute_dtype = dtype
    return f"quantization.compute_dtype=auto: {dtype} ({why})"


def quant_config(quantization):
    """The recipe's `quantization` node (a DictConfig, or the dict a run's config.yaml holds) as the
    registered config of its format: QuantConfig for nf4/fp4, Int8Config for int8, GPTQQuantConfig for
    method=gptq."""
    q = quantization
    if q["compute_dtype"] == "auto":  # a recipe composed outside a run: for the device torch defaults to
        import torch

        q = {**q, "compute_dtype": native_compute_dtype("cuda" if torch.cuda.is_available() else "cpu")[0]}
    skip = q.get("skip_modules")
    skip = list(skip) if skip is not None else None
    if q.get("method", "bitsandbytes") == "gptq":  # the checkpoint's own quantize_config describes the rest
        from qlora.quant.gptq.config import GPTQQuantConfig

        return GPTQQuantConfig(compute_dtype=q["compute_dtype"])
    if q["quant_type"] == "int8":
        from qlora.quant.int8.config import Int8Config

        return Int8Config(threshold=q.get("threshold", 6.0), compute_dtype=q["compute_dtype"], skip_modules=skip)
    from qlora.quant.nf4.config import QuantConfig

    return QuantConfig(quant_type=q["quant_type"], double_quant=q["double_quant"], compute_dtype=q["compute_dtype"],
                       blocksize=q["blocksize"], quant_storage=q["quant_storage"], skip_modules=skip)


def dense_dtype(model) -> Optional[torch.dtype]:
    """`model.dtype` (the layers that stay dense) as a torch dtype; None = the compute dtype."""
    import torch

    name = model.get("dtype")
    return getattr(torch, name) if name else None
