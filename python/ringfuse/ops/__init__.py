"""torch custom ops (``torch.ops.ringfuse.*``) and their fast eager entry points."""

from ._common import DeviceValueError, check_device_errors, cuda_backend, set_cuda_backend
from .attention import (
    PagedDecodePlan,
    attention,
    attention_varlen,
    decode_attention,
    paged_decode_attention,
    write_kv,
)
from .cpu_graph import CaptureBusy, CpuGraph, NotCapturable, capture_cpu_graph
from .int8_gemm import (
    int8_gemm,
    PreparedInt8WeightOnlyLinear,
    int8_weight_only_linear,
    pack_int8_weight,
    prepare_int8_linear,
    w8a8_linear,
    prepare_int8_weight_only_linear,
    quantize_per_token,
)
from .layer_norm import add_layer_norm, layer_norm
from .linear import PreparedLinear, linear, linear_path, prepare_linear
from .rms_norm import PreparedRMSNorm, add_rms_norm, add_rms_norm_, prepare_rms_norm, rms_norm
from .rotary_embedding import cos_sin_cache, rotary_embedding
from .silu_mul import gelu_tanh_mul, silu_mul

__all__ = [
    "CaptureBusy",
    "CpuGraph",
    "DeviceValueError",
    "NotCapturable",
    "PagedDecodePlan",
    "PreparedInt8WeightOnlyLinear",
    "PreparedLinear",
    "PreparedRMSNorm",
    "add_layer_norm",
    "add_rms_norm",
    "add_rms_norm_",
    "attention",
    "attention_varlen",
    "capture_cpu_graph",
    "check_device_errors",
    "cos_sin_cache",
    "cuda_backend",
    "gelu_tanh_mul",
    "int8_gemm",
    "int8_weight_only_linear",
    "decode_attention",
    "layer_norm",
    "linear",
    "linear_path",
    "pack_int8_weight",
    "prepare_int8_linear",
    "w8a8_linear",
    "prepare_int8_weight_only_linear",
    "prepare_linear",
    "prepare_rms_norm",
    "paged_decode_attention",
    "quantize_per_token",
    "rms_norm",
    "rotary_embedding",
    "set_cuda_backend",
    "silu_mul",
    "write_kv",
]
