"""GPTQ (AutoGPTQ / GPTQModel / optimum checkpoints, v1 and v2): `weight` (GPTQWeight, the
registered format "gptq"), `solver` (GPTQ for one layer) and `config` (GPTQQuantConfig, transformers'
GPTQConfig). Calibrating a whole model needs its layers, so it lives a floor up, in
qlora.models.gptq_calibration."""
from qlora.quant.gptq.config import GPTQQuantConfig
from qlora.quant.gptq.weight import GPTQWeight

__all__ = ["GPTQQuantConfig", "GPTQWeight"]
