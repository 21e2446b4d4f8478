"""SwiGLU activation, as vLLM's silu_and_mul: ``silu_mul(x [..., 2 d]) -> [..., d]`` is
``F.silu(x[..., :d]) * x[..., d:]`` (the gate and up projections of a Llama MLP, computed by
one GEMM, in one pass instead of torch's silu, a temporary and a multiply).

CPU kernel (csrc/cpu/silu_mul.cpp): float32 / bfloat16 / float16, fp32 math (a ~2 ulp exp;
fp32 outputs within 3 ulp of exact, not bitwise torch's) with one rounding to fp16 / bf16
(within 1 ulp of exact);
x's rows may be strided (unit inner stride). Fallback (documented): CUDA tensors, float64 and
autograd run the torch expression above. Registered as ``torch.ops.ringfuse.silu_mul`` (fake
kernel, for torch.compile); eager calls reach ``_C.silu_mul`` directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _C
from . import _common as c
from .rms_norm import OP_LIB

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def silu_mul(x):
    """``F.silu(x[..., :d]) * x[..., d:]`` for x [..., 2 d] -> [..., d], in x's dtype."""
    op = "silu_mul"
    c.check_float_tensor(op, "x", x, KERNEL_DTYPES + (torch.float64,))
    if x.dim() < 1 or x.shape[-1] % 2 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., 2 d] (gate | up) with an even, non-zero last dim, got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    if not x.is_cpu or x.dtype == torch.float64 or c.needs_autograd(x):
        return _torch(x)
    if torch.compiler.is_compiling():
        return torch.ops.ringfuse.silu_mul(x)
    return _forward(x)


def _torch(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def _forward(x):
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype)  # [..., d]
    rows = out.numel() // d
    if rows:
        xr = c.rows(x)  # [rows, 2 d], a copy only if the rows are not evenly strided
        _C.silu_mul(out.data_ptr(), d, xr.t.data_ptr(), xr.stride, rows, d, c.DTYPE_CODE[x.dtype], c.num_threads())
    return out


def _silu_mul_impl(x):
    return _forward(x) if x.is_cpu and x.dtype in KERNEL_DTYPES else _torch(x)


OP_LIB.define("silu_mul(Tensor x) -> Tensor")
for _key in ("CPU", "CUDA"):
    OP_LIB.impl("silu_mul", _silu_mul_impl, _key)


@torch.library.register_fake("ringfuse::silu_mul")
def _silu_mul_fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
