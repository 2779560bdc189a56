"""GPTQQuantConfig: how a model is (or was) GPTQ-quantized, read from and written as transformers'
GPTQConfig dict (config.json's `quantization_config`) and AutoGPTQ's quantize_config.json.

Calibration options (dataset, tokenizer, model_seqlen, block names, batch_size, ...) are used when
`qlora.load_model(dense, quantization_config=GPTQConfig(...))` quantizes; the layout options
(bits, group_size, sym, desc_act, checkpoint_format) describe the packed tensors.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch

from qlora.errors import DamagedFileError, OptionError
from qlora.quant.config import DEFAULT_SKIP_MODULES, register_quant_config
from qlora.kernels.dtypes import parse_dtype
from qlora.kernels.gptq.format import check_bits
from qlora.quant.gptq.weight import check_checkpoint_format, check_group_size

QUANTIZE_CONFIG_NAME = "quantize_config.json"
# Keys of transformers' GPTQConfig.to_dict() qlora has no use for (kernel choices of other libraries).
_IGNORED_KEYS = {"quant_method", "backend", "use_cuda_fp16", "use_exllama", "exllama_config", "max_input_length",
                 "act_group_aware", "disable_exllama", "tokenizer", "format", "v2", "hyb_act", "mse", "pack_dtype",
                 "quantize_config", "lm_head", "adapter", "rotation", "parallel_packing", "device", "offload_to_disk",
                 "offload_to_disk_path", "buffered_fwd", "fail_safe", "dynamic", "true_sequential_order", "meta",
                 "model_name_or_path", "model_file_base_name", "is_marlin_format", "dataset", "damp_auto_increment",
                 "method",
                 "use_marlin", "bitblas_config", "zero_point", "desc_act_sort"}


@register_quant_config
@dataclasses.dataclass
class GPTQQuantConfig:
    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.1
    desc_act: bool = False
    sym: bool = True
    static_groups: bool = False
    true_sequential: bool = True
    checkpoint_format: str = "gptq"
    dataset: Any = None  # list of strings, a local text/json(l) file, or a Hub dataset name ("wikitext2", "c4")
    tokenizer: Any = None  # a tokenizer or its name; default the model's own
    model_seqlen: Optional[int] = None  # tokens per calibration sample (default min(2048, the model's context))
    block_name_to_quantize: Optional[str] = None  # e.g. "model.layers" (default: found)
    module_name_preceding_first_block: Optional[list[str]] = None
    modules_in_block_to_quantize: Optional[list] = None  # [[names quantized together], ...] (default: all linears)
    batch_size: int = 1
    pad_token_id: Optional[int] = None
    cache_block_outputs: bool = True
    max_calibration_samples: int = 128
    compute_dtype: Any = torch.bfloat16
    skip_modules: Optional[list[str]] = None
    meta: Optional[dict] = None

    def __post_init__(self):
        try:
            check_bits(self.bits)  # the kernels' rule, raised as theirs; here it is the user's option
        except ValueError as err:
            raise OptionError(str(err)) from None
        check_group_size(self.group_size)
        self.checkpoint_format = check_checkpoint_format(self.checkpoint_format)
        if not (isinstance(self.damp_percent, (int, float)) and 0 < self.damp_percent < 1):
            raise OptionError(f"GPTQ damp_percent must be in (0, 1), got {self.damp_percent!r} (0.01 to 0.1 are usual)")
        if self.model_seqlen is not None and int(self.model_seqlen) < 1:
            raise OptionError(f"GPTQ model_seqlen must be a positive number of tokens, got {self.model_seqlen!r}")
        if int(self.batch_size) < 1:
            raise OptionError(f"GPTQ batch_size must be >= 1, got {self.batch_size!r}")
        self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        self.skip_modules = list(DEFAULT_SKIP_MODULES if self.skip_modules is None else self.skip_modules)

    format = "gptq"  # the registered QuantizedWeight

    # ---- the plumbing's protocol ------------------------------------------------------------------
    def weight_options(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act,
                    checkpoint_format=self.checkpoint_format)

    def checkpoint_options(self) -> dict:
        """Keywords of GPTQWeight.from_checkpoint: what the tensors' shapes do not say."""
        return self.weight_options()

    # Re-quantizing a dense W does not reproduce GPTQ (it depends on the calibration activations):
    # an export merge must read the packed checkpoint.
    requantizable = False

    def quantizes(self, module_name: str) -> bool:
        """Whether a linear layer is GPTQ-quantized: inside the decoder blocks, and among
        modules_in_block_to_quantize when given."""
        if any(module_name == s or module_name.endswith("." + s) for s in self.skip_modules):
            return False
        if self.modules_in_block_to_quantize:
            names = [n for group in self.modules_in_block_to_quantize for n in ([group] if isinstance(group, str) else group)]
            return any(module_name.endswith("." + n) for n in names)
        return True

    @property
    def calibrating(self) -> bool:
        """True when loading a dense model with this config quantizes it (GPTQ needs calibration)."""
        return True

    # ---- dict forms -----------------------------------------------------------------------------
    @classmethod
    def matches(cls, d: dict) -> bool:
        return str(d.get("quant_method", "")).split(".")[-1].lower() == "gptq"

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GPTQQuantConfig":
        d = dict(d)
        fmt = d.get("checkpoint_format") or d.get("format") or "gptq"
        if d.get("is_marlin_format") or d.get("use_marlin"):
            fmt = "marlin"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in _IGNORED_KEYS)
        if unknown:
            import logging

            logging.getLogger(__name__).warning("GPTQ config keys qlora does not use: %s", unknown)
        options = {k: v for k, v in d.items() if k in known and k not in ("checkpoint_format", "skip_modules")}
        if "bits" in options and isinstance(options["bits"], str) and options["bits"].isdigit():
            options["bits"] = int(options["bits"])
        dataset = options.get("dataset")
        if dataset is not None and not isinstance(dataset, (str, list)):
            options.pop("dataset")
        options = {k: v for k, v in options.items() if v is not None or k in ("dataset", "tokenizer", "model_seqlen")}
        options.pop("tokenizer", None)
        return cls(checkpoint_format=fmt, **options, tokenizer=d.get("tokenizer"))

    def to_hf_dict(self) -> dict:
        """config.json's quantization_config, as transformers' GPTQConfig (and optimum/GPTQModel) read it."""
        return {
            "quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
            "damp_percent": self.damp_percent, "desc_act": self.desc_act, "static_groups": self.static_groups,
            "sym": self.sym, "true_sequential": self.true_sequential,
            "checkpoint_format": self.checkpoint_format, "format": self.checkpoint_format,
            "model_seqlen": self.model_seqlen, "block_name_to_quantize": self.block_name_to_quantize,
            "module_name_preceding_first_block": self.module_name_preceding_first_block,
            "modules_in_block_to_quantize": self.modules_in_block_to_quantize,
            "batch_size": self.batch_size, "pad_token_id": self.pad_token_id,
            "cache_block_outputs": self.cache_block_outputs, "dataset": None, "tokenizer": None,
            "use_exllama": False, "meta": dict(self.meta or {"quantizer": ["qlora"]}),
        }

    def quantize_config_json(self) -> dict:
        """AutoGPTQ/GPTQModel's quantize_config.json."""
        return {"bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
                "desc_act": self.desc_act, "static_groups": self.static_groups, "sym": self.sym,
                "true_sequential": self.true_sequential, "quant_method": "gptq",
                "checkpoint_format": self.checkpoint_format, "model_name_or_path": None,
                "model_file_base_name": None, "meta": dict(self.meta or {"quantizer": ["qlora"]})}

    def extra_files(self) -> dict[str, str]:
        """Files save_model writes beside config.json."""
        return {QUANTIZE_CONFIG_NAME: json.dumps(self.quantize_config_json(), indent=2) + "\n"}


def read_quantize_config(directory: Path) -> Optional[dict]:
    """quantize_config.json of an AutoGPTQ-era checkpoint (no quantization_config in config.json), as a
    quantization_config dict; None when the directory has none."""
    path = Path(directory) / QUANTIZE_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except ValueError as err:
        raise DamagedFileError(f"{path} is not valid JSON ({err}); re-download or rewrite it") from err
    d.setdefault("quant_method", "gptq")
    return d

