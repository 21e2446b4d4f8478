"""Drop-in norm modules backed by ringfuse's fused kernels.

``LayerNorm`` and ``RMSNorm`` subclass torch.nn.LayerNorm / torch.nn.RMSNorm: same
constructor arguments, parameter names and state_dict keys, so they load the same
checkpoints and pass isinstance checks. ``AddRMSNorm`` fuses the residual add.
"""

from __future__ import annotations

import math

import torch

from .. import ops


def _flatten_trailing(x: torch.Tensor, param, ndim: int):
    """Normalizing over several trailing dims == normalizing their flattening."""
    if ndim == 1:
        return x, param
    n = math.prod(x.shape[-ndim:])
    return x.reshape(*x.shape[:-ndim], n), None if param is None else param.reshape(n)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm with a fused kernel. ``cast_mode="llama"`` reproduces HF
    LlamaRMSNorm's rounding order (normalize in fp32, round to x's dtype, then * weight)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None,
                 *, cast_mode: str = "torch"):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        if cast_mode not in ("torch", "llama"):
            raise ValueError(f"RMSNorm: cast_mode must be 'torch' or 'llama', got {cast_mode!r}")
        self.cast_mode = cast_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ndim = len(self.normalized_shape)
        if tuple(x.shape[-ndim:]) != tuple(self.normalized_shape):
            raise ValueError(f"RMSNorm: input's trailing shape must be {tuple(self.normalized_shape)}, got {tuple(x.shape)}")
        # eps=None: torch takes the epsilon of the type it computes in (fp32 for 16-bit x)
        eps = self.eps if self.eps is not None else torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
        x2, w = _flatten_trailing(x, self.weight, ndim)
        y = ops.rms_norm(x2, w, eps, cast_mode=self.cast_mode)
        return y.view(*x.shape[:-ndim], *x.shape[-ndim:]) if ndim > 1 else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", cast_mode={self.cast_mode!r}"


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm with a fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ndim = len(self.normalized_shape)
        if tuple(x.shape[-ndim:]) != tuple(self.normalized_shape):
            raise ValueError(f"LayerNorm: input's trailing shape must be {tuple(self.normalized_shape)}, got {tuple(x.shape)}")
        x2, w = _flatten_trailing(x, self.weight, ndim)
        _, b = _flatten_trailing(x, self.bias, ndim)
        y = ops.layer_norm(x2, w, b, self.eps)
        return y.view(x.shape) if ndim > 1 else y


class AddRMSNorm(torch.nn.Module):
    """``forward(x, residual) -> (RMSNorm(x + residual), x + residual)`` in one pass: the
    pre-norm pattern of Llama blocks. State dict: ``weight`` [hidden_size]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, cast_mode: str = "torch", device=None, dtype=None):
        super().__init__()
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 1:
            raise ValueError(f"AddRMSNorm: hidden_size must be a positive int, got {hidden_size!r}")
        if cast_mode not in ("torch", "llama"):
            raise ValueError(f"AddRMSNorm: cast_mode must be 'torch' or 'llama', got {cast_mode!r}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.cast_mode = cast_mode
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        return ops.add_rms_norm(x, residual, self.weight, self.eps, cast_mode=self.cast_mode)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, cast_mode={self.cast_mode!r}"
