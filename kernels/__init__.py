"""4-bit kernels (installed as qlora.kernels). Imports nothing from the rest of qlora.

`reference` holds the pure-PyTorch twins (the CPU path and the test oracle); `linear_4bit` is the
frozen-weight 4-bit linear with autograd.
"""
from qlora.kernels import reference
from qlora.kernels.linear import Linear4bitFunction, linear_4bit

__all__ = ["Linear4bitFunction", "linear_4bit", "reference"]
