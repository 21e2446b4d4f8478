"""Gated MLP activations, as vLLM's silu_and_mul / gelu_tanh_and_mul:

- ``silu_mul(x [..., 2 d]) -> [..., d]`` is ``F.silu(x[..., :d]) * x[..., d:]`` (SwiGLU:
  Llama, Mistral, Qwen);
- ``gelu_tanh_mul(x)`` is ``F.gelu(x[..., :d], approximate="tanh") * x[..., d:]`` (GeGLU:
  Gemma's gelu_pytorch_tanh),

the gate and up projections of an MLP computed by one GEMM, in one pass instead of torch's
activation, a temporary and a multiply.

CPU kernel (csrc/cpu/silu_mul.cpp): float32 / bfloat16 / float16, fp32 math (a ~2 ulp exp;
fp32 outputs within 3 ulp of exact, not bitwise torch's) with one rounding to fp16 / bf16
(within 1 ulp of exact); CUDA: the Triton kernel in kernels/silu_mul.py, the same math and
rounding (one pass: gate and up read once, out written once). x's rows may be strided (unit
inner stride). Fallback (documented): float64 and autograd run the torch expression above.
Registered as ``torch.ops.ringfuse.silu_mul`` and ``torch.ops.ringfuse.gelu_tanh_mul``
(fake kernels, for torch.compile); eager calls reach the kernels directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common as c
from . import native
from .rms_norm import OP_LIB

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def silu_mul(x):
    """``F.silu(x[..., :d]) * x[..., d:]`` for x [..., 2 d] -> [..., d], in x's dtype."""
    return _gated("silu_mul", x)


def gelu_tanh_mul(x):
    """``F.gelu(x[..., :d], approximate="tanh") * x[..., d:]`` for x [..., 2 d] -> [..., d],
    in x's dtype."""
    return _gated("gelu_tanh_mul", x)


def _gated(op, x):
    c.check_float_tensor(op, "x", x, KERNEL_DTYPES + (torch.float64,))
    if x.dim() < 1 or x.shape[-1] % 2 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., 2 d] (gate | up) with an even, non-zero last dim, got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    if not (x.is_cpu or x.is_cuda) or x.dtype == torch.float64 or c.needs_autograd(x):
        return _torch(op, x)
    if torch.compiler.is_compiling():
        return getattr(torch.ops.ringfuse, op)(x)
    return _forward(op, x)


def _torch(op, x):
    d = x.shape[-1] // 2
    gate = F.silu(x[..., :d]) if op == "silu_mul" else F.gelu(x[..., :d], approximate="tanh")
    return gate * x[..., d:]


def _forward(op, x):
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)  # [..., d]
    rows = out.numel() // d
    if not rows:
        return out
    if x.is_cuda:
        from ..kernels import silu_mul as tk

        # a 2-D x with unit inner stride is read as it is (rows are only read: any row stride)
        x2 = x if x.dim() == 2 and x.stride(1) == 1 else c.rows(x).as_2d(rows, 2 * d)  # [rows, 2 d]
        tk.gated_mul_fwd(out if out.dim() == 2 else out.view(rows, d), x2, op)
        return out
    xr = c.rows(x)  # [rows, 2 d], a copy only if the rows are not evenly strided
    native.silu_mul(out, d, xr.t, xr.stride, rows, d, op)
    return out


def _register(op):
    def impl(x):
        return _forward(op, x) if x.dtype in KERNEL_DTYPES else _torch(op, x)

    def fake(x):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    OP_LIB.define(f"{op}(Tensor x) -> Tensor")
    for key in ("CPU", "CUDA"):
        OP_LIB.impl(op, impl, key)
    torch.library.register_fake(f"ringfuse::{op}")(fake)


for _op in native.GATED_ACTIVATIONS:
    _register(_op)
