"""Rotary position embedding (RoPE), in place, as vLLM's rotary_embedding op.

``rotary_embedding(q, k, positions, cos_sin_cache, style="neox")`` rotates, for every token
t at position ``positions[t]``, the first ``rot_dim`` dims of each head of q [T, Hq, D] and
k [T, Hkv, D] (k may be None). ``cos_sin_cache`` [max_positions, rot_dim] fp32 holds cos in
its first half and sin in its second, as ``cos_sin_cache(...)`` builds it. style "neox"
(Llama, "rotate half": pairs (i, i + rot_dim/2)) or "gptj" (interleaved pairs (2i, 2i+1)).
Math in fp32, one rounding to x's dtype. CPU: csrc/cpu/rotary_embedding.cpp (AVX2 + scalar);
CUDA: the Triton kernel in kernels/rotary_embedding.py.
"""

from __future__ import annotations

import math

import torch

from . import _common as c
from . import native
from .rms_norm import OP_LIB

STYLES = ("neox", "gptj")


def cos_sin_cache(max_positions: int, rot_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """[max_positions, rot_dim] fp32: cos(p * f_i) | sin(p * f_i), f_i = base^(-2i / rot_dim),
    computed in fp64 then rounded (HF's inv_freq formula)."""
    if not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"cos_sin_cache: max_positions must be a positive int, got {max_positions!r}")
    if not isinstance(rot_dim, int) or rot_dim < 2 or rot_dim % 2:
        raise ValueError(f"cos_sin_cache: rot_dim must be an even int >= 2, got {rot_dim!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
        raise ValueError(f"cos_sin_cache: base must be a finite number > 0, got {base!r}")  # else a NaN cache
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)  # [rot/2]
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(device)


def _check_x(op, name, x, ref=None):
    c.check_float_tensor(op, name, x)
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a unit stride in its last dimension (rotated in place), got strides {x.stride()}")
    if ref is not None:
        if x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(f"{op}: {name} must have q's dtype and device ({ref.dtype}, {ref.device}), got {x.dtype}, {x.device}")
        if x.shape[0] != ref.shape[0] or x.shape[2] != ref.shape[2]:
            raise ValueError(f"{op}: {name} must have q's tokens and head_dim, got {tuple(x.shape)} vs q {tuple(ref.shape)}")


def _share_memory(q, k) -> bool:
    """Whether q and k [T, H*, D] share elements. Disjoint spans are the quick answer; views
    of one fused projection (q and k heads of each token side by side, one token stride)
    interleave their spans but not their elements: there each token's q and k windows must
    lie apart modulo the token stride."""
    if not c.overlap(q, k):
        return False
    es = q.element_size()
    if q.shape[0] < 2 or q.stride(0) != k.stride(0) or q.stride(0) <= 0:
        return True
    row = q.stride(0) * es
    ext_q = ((q.shape[1] - 1) * q.stride(1) + q.shape[2]) * es
    ext_k = ((k.shape[1] - 1) * k.stride(1) + k.shape[2]) * es
    delta = (k.data_ptr() - q.data_ptr()) % row
    return not (ext_q + ext_k <= row and ext_q <= delta <= row - ext_k)


def rotary_embedding(q, k, positions, cos_sin_cache, *, style: str = "neox"):
    """Rotate q and k in place; returns (q, k)."""
    op = "rotary_embedding"
    if style not in STYLES:
        raise ValueError(f"{op}: style must be one of {STYLES}, got {style!r}")
    _check_x(op, "q", q)
    if k is not None:
        _check_x(op, "k", k, q)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # traced tensors have no memory: the op's kernel checks then (_rotate_op)
        _check_memory(op, q, k)
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: positions must be an int64 or int32 tensor, got "
                        f"{positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"{op}: positions must have shape ({q.shape[0]},) (one per token), got {tuple(positions.shape)}")
    if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2:
        raise TypeError(f"{op}: cos_sin_cache must be a float32 [max_positions, rot_dim] tensor")
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim < 2 or rot_dim % 2 or rot_dim > q.shape[2]:
        raise ValueError(f"{op}: cos_sin_cache's rot_dim must be even and <= head_dim {q.shape[2]}, got {rot_dim}")
    for name, t in (("positions", positions), ("cos_sin_cache", cos_sin_cache)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if c.needs_autograd(q, k):
        raise ValueError(f"{op}: q and k are rotated in place, which autograd cannot follow (q or k requires grad); "
                         "rotate under torch.no_grad(), or use a differentiable RoPE for training")  # fmt: skip
    if compiling:
        torch.ops.ringfuse.rotary_embedding(q, k, positions, cos_sin_cache, style == "gptj")
        return q, k
    _rotate(q, k, positions, cos_sin_cache, style == "gptj")
    c.mark_written(q, k)
    return q, k


def _check_memory(op, q, k) -> None:
    """q and k are rotated in place: no element may be reached twice."""
    for name, t in (("q", q), ("k", k)):
        if t is not None and t.numel() and c.rows_overlap(t):
            raise ValueError(f"{op}: {name}'s (token, head) rows overlap in memory (strides {t.stride()}, e.g. an "
                             f"expanded tensor): it is rotated in place; pass {name}.contiguous()")  # fmt: skip
    if k is not None and q.numel() and k.numel() and _share_memory(q, k):
        raise ValueError(f"{op}: q and k share memory (the same tensor or overlapping views): each is rotated in "
                         "place, so shared elements would be rotated twice")  # fmt: skip


def _rotate_op(q, k, positions, cache, gptj: bool) -> None:
    """The registered op's kernel (what a compiled graph runs): the memory check the traced
    wrapper could not make, then the rotation."""
    _check_memory("rotary_embedding", q, k)
    _rotate(q, k, positions, cache, gptj)


def _rotate(q, k, positions, cache, gptj: bool) -> None:
    positions = positions.to(torch.int64).contiguous()
    cache = cache if cache.stride(1) == 1 else cache.contiguous()
    if q.is_cuda:
        from ..kernels import rotary_embedding as tk

        for x in (q, k):  # positions are checked by the kernel (no sync): c.check_device_errors
            if x is not None:
                tk.rotary_embedding_fwd(x, positions, cache, gptj)
        c.after_launch(q.device)
        return
    for x in (q, k):
        if x is None or x.numel() == 0:
            continue
        native.rotary_embedding(x, x.stride(0), x.stride(1), *x.shape, positions, cache, cache.stride(0),
                                *cache.shape, gptj)  # fmt: skip


OP_LIB.define("rotary_embedding(Tensor(a!) q, Tensor(b!)? k, Tensor positions, Tensor cos_sin_cache, bool gptj) -> ()")
OP_LIB.impl("rotary_embedding", _rotate_op, "CPU")
OP_LIB.impl("rotary_embedding", _rotate_op, "CUDA")


@torch.library.register_fake("ringfuse::rotary_embedding")
def _rotary_fake(q, k, positions, cos_sin_cache, gptj):
    return None
