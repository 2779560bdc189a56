"""QuantConfig: how a model is NF4/FP4-quantized (BitsAndBytesConfig's 4-bit half), read from and
written as transformers' BitsAndBytesConfig dict (config.json's `quantization_config`). The default
registered config (qlora.quant.config): what a model loads in when no format is named.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from qlora.kernels.nf4.format import check_blocksize, check_storage_dtype
from qlora.kernels.dtypes import dtype_name, parse_dtype
from qlora.quant.config import DEFAULT_SKIP_MODULES, as_config_dict, register_quant_config
from qlora.quant.nf4.quantize import check_quant_type


def _as_dtype(value, what: str, allow_uint8: bool = False) -> torch.dtype:
    return parse_dtype(value, what, allow_uint8=allow_uint8)


@register_quant_config(default=True)
@dataclasses.dataclass
class QuantConfig:
    """How the base model's linear layers are quantized.

    quant_type: "nf4" (QLoRA's default) or "fp4".
    double_quant: also quantize the per-block absmax (saves ~0.37 bits/param).
    compute_dtype: dtype the 4-bit layers compute in; bf16 by default (fp32 is a silent slowdown).
    blocksize: elements per absmax block, a power of two in [32, 4096].
    quant_storage: dtype the packed bytes are stored as (uint8, or bf16/fp16/fp32 for FSDP).
    skip_modules: module names (or name suffixes) kept in full precision; the output head always is.
    enable_fp32_cpu_offload: modules a device_map puts on "cpu" or "disk" stay unquantized in fp32.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: Any = torch.bfloat16
    blocksize: int = 64
    quant_storage: Any = torch.uint8
    skip_modules: Optional[list[str]] = None
    enable_fp32_cpu_offload: bool = False

    def __post_init__(self):
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        self.compute_dtype = _as_dtype(self.compute_dtype, "compute_dtype")
        self.quant_storage = _as_dtype(self.quant_storage, "quant_storage", allow_uint8=True)
        check_storage_dtype(self.quant_storage)
        self.skip_modules = list(DEFAULT_SKIP_MODULES if self.skip_modules is None else self.skip_modules)

    @property
    def format(self) -> str:
        return self.quant_type

    def weight_options(self) -> dict:
        """Keyword arguments of Weight4bit.quantize / placeholder."""
        return dict(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                    quant_storage=self.quant_storage)

    def layer_options(self) -> dict:
        """Keyword arguments for qlora.nn.Linear4bit."""
        return dict(compute_dtype=self.compute_dtype, **self.weight_options())

    @classmethod
    def matches(cls, d: dict) -> bool:
        method = str(d.get("quant_method", "bitsandbytes")).split(".")[-1].lower()
        return method in ("bitsandbytes", "bits_and_bytes") and bool(d.get("load_in_4bit") or d.get("_load_in_4bit"))

    @classmethod
    def from_hf_dict(cls, d: dict) -> "QuantConfig":
        return cls._from_bnb_dict(d)

    def to_hf_dict(self) -> dict:
        return self.to_bnb_dict()

    def to_bnb_dict(self) -> dict:
        """The `quantization_config` entry of config.json, as transformers + bitsandbytes read it."""
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": dtype_name(self.quant_storage),
            "llm_int8_skip_modules": list(self.skip_modules),
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": self.enable_fp32_cpu_offload,
        }

    @classmethod
    def from_any(cls, config) -> "QuantConfig":
        """Accept a QuantConfig, a transformers BitsAndBytesConfig, or a config.json-style dict."""
        if isinstance(config, cls):
            return config
        return cls() if config is None else cls._from_bnb_dict(as_config_dict(config))

    @classmethod
    def _from_bnb_dict(cls, d: dict) -> "QuantConfig":
        method = str(d.get("quant_method", "bitsandbytes")).split(".")[-1].lower()
        if method not in ("bitsandbytes", "bits_and_bytes"):
            raise NotImplementedError(f"quant_method={method!r} is not supported; qlora loads bitsandbytes 4-bit checkpoints")
        if (d.get("load_in_8bit") or d.get("_load_in_8bit")) and (d.get("load_in_4bit") or d.get("_load_in_4bit")):
            raise ValueError("the quantization_config sets both load_in_4bit and load_in_8bit; choose one "
                             "(load_in_4bit=True for NF4/FP4, load_in_8bit=True for LLM.int8)")
        if d.get("load_in_8bit") or d.get("_load_in_8bit"):
            raise ValueError("load_in_8bit=True describes LLM.int8, not a 4-bit QuantConfig; pass it to "
                             "qlora.quant.config.quant_config_from_any (or qlora.Int8Config)")
        if not (d.get("load_in_4bit") or d.get("_load_in_4bit")):
            raise ValueError("the BitsAndBytesConfig asks for no quantization (load_in_4bit=False); set load_in_4bit=True")
        skip = d.get("llm_int8_skip_modules")
        return cls(
            quant_type=d.get("bnb_4bit_quant_type", "fp4"),
            double_quant=bool(d.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=d.get("bnb_4bit_compute_dtype") or "float32",
            quant_storage=d.get("bnb_4bit_quant_storage") or "uint8",
            skip_modules=None if skip is None else list(skip),
            enable_fp32_cpu_offload=bool(d.get("llm_int8_enable_fp32_cpu_offload", False)),
        )
