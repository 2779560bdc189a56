"""Int8Config: BitsAndBytesConfig's 8-bit half (load_in_8bit) as a registered quantization config.

Reads and writes config.json's `quantization_config` as transformers + bitsandbytes spell it:
quant_method "bitsandbytes", load_in_8bit, llm_int8_threshold, llm_int8_skip_modules,
llm_int8_enable_fp32_cpu_offload, llm_int8_has_fp16_weight (and the bnb_4bit_* keys at their
defaults, which transformers writes for 8-bit models too).

llm_int8_has_fp16_weight=True is refused: bitsandbytes then keeps a trainable 16-bit copy of every
weight and re-quantizes it on each forward, which is full fine-tuning at 16-bit memory (the 8-bit
bytes only add to it). qlora's bases are frozen and trained through LoRA adapters.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from qlora.errors import OptionError
from qlora.quant.config import DEFAULT_SKIP_MODULES, register_quant_config
from qlora.kernels.dtypes import parse_dtype
from qlora.quant.int8.weight import DEFAULT_THRESHOLD, check_threshold


def bnb_method(d: dict) -> str:
    return str(d.get("quant_method", "bitsandbytes")).split(".")[-1].lower()


def check_one_bit_width(d: dict) -> None:
    if (d.get("load_in_4bit") or d.get("_load_in_4bit")) and (d.get("load_in_8bit") or d.get("_load_in_8bit")):
        raise OptionError("the quantization_config sets both load_in_4bit and load_in_8bit; choose one "
                         "(load_in_4bit=True for NF4/FP4, load_in_8bit=True for LLM.int8)")


@register_quant_config
@dataclasses.dataclass
class Int8Config:
    """LLM.int8 (bitsandbytes' 8-bit format) for the base model's linear layers.

    threshold: activations with |x| >= threshold mark outlier columns, multiplied in 16-bit (6.0 by
        default; lower for small or fine-tuned models; 0 turns the decomposition off).
    compute_dtype: the dtype the layers compute in (bf16 by default).
    skip_modules: module names (or name suffixes) kept in full precision; the output head always is.
    enable_fp32_cpu_offload: modules a device_map puts on "cpu" or "disk" stay unquantized in fp32.
    """

    threshold: float = DEFAULT_THRESHOLD
    compute_dtype: Any = torch.bfloat16
    skip_modules: Optional[list[str]] = None
    enable_fp32_cpu_offload: bool = False
    has_fp16_weight: bool = False

    format = "int8"
    # transformers' 8-bit layers compute in the model's dtype, and the config has no key for it: a
    # prequantized checkpoint loaded with no compute dtype given computes in the checkpoint's dtype.
    compute_dtype_from_checkpoint = True

    def __post_init__(self):
        self.threshold = check_threshold(self.threshold)
        self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        self.skip_modules = list(DEFAULT_SKIP_MODULES if self.skip_modules is None else self.skip_modules)
        if self.has_fp16_weight:
            raise NotImplementedError(
                "llm_int8_has_fp16_weight=True keeps a trainable 16-bit copy of every weight and re-quantizes it "
                "each forward (full fine-tuning at 16-bit memory); qlora keeps the 8-bit base frozen and trains "
                "LoRA adapters: set llm_int8_has_fp16_weight=False, or fine-tune the dense model without quantization"
            )

    def weight_options(self) -> dict:
        """Keyword arguments of Weight8bit.quantize / placeholder."""
        return dict(threshold=self.threshold)

    def layer_options(self) -> dict:
        return dict(compute_dtype=self.compute_dtype, **self.weight_options())

    @classmethod
    def matches(cls, d: dict) -> bool:
        check_one_bit_width(d)
        return bnb_method(d) in ("bitsandbytes", "bits_and_bytes") and bool(d.get("load_in_8bit") or d.get("_load_in_8bit"))

    @classmethod
    def from_hf_dict(cls, d: dict) -> "Int8Config":
        """transformers' 8-bit computes in the model's dtype and has no compute-dtype key: bf16 here;
        load_model then takes the checkpoint's dtype, or the compute_dtype of the config it is given."""
        skip = d.get("llm_int8_skip_modules")
        return cls(threshold=d.get("llm_int8_threshold", DEFAULT_THRESHOLD),
                   skip_modules=None if skip is None else list(skip),
                   enable_fp32_cpu_offload=bool(d.get("llm_int8_enable_fp32_cpu_offload", False)),
                   has_fp16_weight=bool(d.get("llm_int8_has_fp16_weight", False)))

    def to_hf_dict(self) -> dict:
        """The `quantization_config` entry of config.json, as transformers + bitsandbytes read it."""
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": False,
            "_load_in_8bit": True,
            "load_in_4bit": False,
            "load_in_8bit": True,
            "llm_int8_threshold": self.threshold,
            "llm_int8_skip_modules": list(self.skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_use_double_quant": False,
            "bnb_4bit_quant_storage": "uint8",
        }
