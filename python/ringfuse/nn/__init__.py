"""Drop-in torch modules built on ringfuse ops."""

from .norms import AddRMSNorm, LayerNorm, RMSNorm
from .patch import patch

__all__ = ["AddRMSNorm", "LayerNorm", "RMSNorm", "patch"]
