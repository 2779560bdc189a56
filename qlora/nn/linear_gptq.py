"""LinearGPTQ: a frozen linear layer holding a GPTQ weight (qweight, qzeros, scales, g_idx)."""
from __future__ import annotations

from typing import Optional

import torch

from qlora.nn.quantized import QuantizedLinear
from qlora.quant.gptq.config import GPTQQuantConfig
from qlora.quant.gptq.weight import GPTQWeight


class LinearGPTQ(QuantizedLinear):
    """y = x @ dequant(W).T + b; W frozen in GPTQ's layout. Its state_dict is the checkpoint's
    entries (qweight, qzeros, scales, g_idx, bias), so what it saves loads in transformers with
    optimum/GPTQModel, and their checkpoints load here."""

    weight_class = GPTQWeight

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: Optional[str] = None,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 bits: int = 4, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                 checkpoint_format: str = "gptq"):
        if format not in (None, "gptq"):
            raise ValueError(f"LinearGPTQ holds format 'gptq', got format={format!r}")
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, device=device, bits=bits,
                         group_size=group_size, sym=sym, desc_act=desc_act, checkpoint_format=checkpoint_format)

    def current_options(self) -> dict:
        weight = self._template
        return dict(bits=weight.bits, group_size=weight.group_size, sym=weight.sym, desc_act=weight.desc_act,
                    checkpoint_format=weight.checkpoint_format)

    def quant_config(self, skip_modules=None) -> GPTQQuantConfig:
        return GPTQQuantConfig(compute_dtype=self.compute_dtype, skip_modules=skip_modules, **self.current_options())

    def checkpoint_options(self) -> dict:
        # The layout options the tensors' shapes do not carry (v1/v2 zeros, act-order).
        return self.current_options()

    def extra_repr(self) -> str:
        weight = self._template
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={weight.bits}, group_size={weight.group_size}, act_order={weight.perm is not None}, "
                f"format={weight.checkpoint_format}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")
