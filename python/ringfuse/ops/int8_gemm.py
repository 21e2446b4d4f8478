"""int8 ops. So far: dynamic per-token activation quantization, the first half of a W8A8
linear layer.

``quantize_per_token(x [..., K]) -> (x_q int8 [..., K], scale fp32 [...])``:
symmetric, one scale per row: ``scale = max|x_row| / 127``, ``x_q = round(x / scale)``
(round half to even, as ``torch.round``), so ``x_q * scale`` approximates x within half a
step. A zero row gets scale 0 and x_q 0. inf / NaN cannot be quantized: ValueError.
Registered as ``torch.ops.ringfuse.quantize_per_token`` (fake kernel for torch.compile; no
autograd: quantization is not differentiable).
"""

from __future__ import annotations

import torch

from .. import _C
from . import _common as c
from .rms_norm import OP_LIB


def quantize_per_token(x):
    op = "quantize_per_token"
    c.check_float_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have at least one dimension of size >= 1 (the K axis), got {tuple(x.shape)}")
    if torch.compiler.is_compiling():
        return torch.ops.ringfuse.quantize_per_token(x)
    return _quantize(x)


def _quantize(x):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # [rows, K]: a view for the usual layouts, else one copy
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    q = torch.empty((rows, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        if x.is_cuda:
            from ..kernels import int8_gemm as tk

            tk.quantize_per_token_fwd(q, scale, x2)
            bad = int(torch.isnan(scale).sum())
            if bad:
                raise ValueError(f"quantize_per_token: x holds inf or NaN in {bad} row(s); int8 cannot represent them")
        else:
            _C.quantize_per_token(q.data_ptr(), q.stride(0), scale.data_ptr(), x2.data_ptr(), x2.stride(0), rows, k,
                                  c.DTYPE_CODE[x.dtype], c.num_threads())  # fmt: skip
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


OP_LIB.define("quantize_per_token(Tensor x) -> (Tensor, Tensor)")
for _key in ("CPU", "CUDA"):
    OP_LIB.impl("quantize_per_token", _quantize, _key)


@torch.library.register_fake("ringfuse::quantize_per_token")
def _quantize_fake(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)
