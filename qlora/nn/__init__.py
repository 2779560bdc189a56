"""Modules: the frozen 4-bit linear layer."""
from qlora.nn.linear4bit import Linear4bit

__all__ = ["Linear4bit"]
