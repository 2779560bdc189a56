"""Optimizers: AdamW with paged optimizer states, in 32 or 8 bits."""
from qlora.optim.adamw import PagedAdamW, PagedAdamW8bit

__all__ = ["PagedAdamW", "PagedAdamW8bit"]
