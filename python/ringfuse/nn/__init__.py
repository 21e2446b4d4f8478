"""Drop-in torch modules built on ringfuse ops."""

from .int8_linear import Int8Linear, quantize_weight
from .norms import AddRMSNorm, LayerNorm, RMSNorm
from .patch import patch
from .quantize import calibrate, quantize, smooth_factors

__all__ = [
    "AddRMSNorm",
    "Int8Linear",
    "LayerNorm",
    "RMSNorm",
    "calibrate",
    "patch",
    "quantize",
    "quantize_weight",
    "smooth_factors",
]
