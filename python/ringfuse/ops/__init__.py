"""torch custom ops (``torch.ops.ringfuse.*``) and their fast eager entry points."""

from ._common import cuda_backend, set_cuda_backend
from .attention import decode_attention, paged_decode_attention
from .layer_norm import add_layer_norm, layer_norm
from .rms_norm import add_rms_norm, add_rms_norm_, rms_norm

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "add_rms_norm_",
    "cuda_backend",
    "decode_attention",
    "layer_norm",
    "paged_decode_attention",
    "rms_norm",
    "set_cuda_backend",
]
