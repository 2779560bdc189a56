"""4-bit kernels (installed as qlora.kernels). Imports nothing from the rest of qlora."""
from qlora.kernels import reference

__all__ = ["reference"]
