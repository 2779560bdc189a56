"""Loading and saving causal LMs with 4-bit layers."""
from qlora.models.loading import load_model, replace_linear_layers
from qlora.models.saving import save_model

__all__ = ["load_model", "replace_linear_layers", "save_model"]
