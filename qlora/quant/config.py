"""The registry of quantization configs: each format registers its config class, and
`quant_config_from_any` reads any of them from a qlora config, a transformers quantization config
(BitsAndBytesConfig, GPTQConfig, ...) or a config.json-style dict.

Every registered config class offers: `format` (a registered QuantizedWeight name), `compute_dtype`,
`skip_modules`, `weight_options()` (keywords of the format's quantize/placeholder), `to_hf_dict()`
(config.json's `quantization_config`), and the classmethods `matches(d)` / `from_hf_dict(d)` that
recognise and read a `quantization_config` dict. One class is the default (`default=True`): what
None gives, and the reader of a dict no class matches (it names what is unsupported).
"""
from __future__ import annotations

DEFAULT_SKIP_MODULES = ("lm_head",)
_CONFIG_CLASSES: list[type] = []
_DEFAULT: list[type] = []  # the one class registered with default=True


def register_quant_config(cls: type = None, *, default: bool = False):
    """Class decorator: let `quant_config_from_any` recognise this format's quantization_config.
    `@register_quant_config(default=True)` also makes it what None and an unrecognised dict give."""
    def register(cls: type) -> type:
        if cls not in _CONFIG_CLASSES:
            _CONFIG_CLASSES.append(cls)
        if default:
            _DEFAULT[:] = [cls]
        return cls
    return register(cls) if cls is not None else register


def default_quant_config_class() -> type:
    # The format folders register when qlora.quant is imported, which importing this module does first.
    return _DEFAULT[0]


def quant_config_from_any(config):
    """A registered config from an instance of one, a transformers quantization config object
    (BitsAndBytesConfig, GPTQConfig, ...) or a config.json-style dict; None gives the default
    format's (NF4) defaults."""
    if config is None:
        return default_quant_config_class()()
    if isinstance(config, tuple(_CONFIG_CLASSES)):
        return config
    config = as_config_dict(config)
    for cls in _CONFIG_CLASSES:
        if cls.matches(config):
            return cls.from_hf_dict(config)
    return default_quant_config_class().from_hf_dict(config)  # names what is unsupported


def as_config_dict(config) -> dict:
    """A transformers quantization config object (anything with to_dict) or a dict, as a dict."""
    if hasattr(config, "to_dict") and not isinstance(config, dict):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(
            f"quantization_config must be a qlora config, a transformers quantization config (BitsAndBytesConfig, "
            f"...) or a dict, got {type(config).__name__}"
        )
    return config
