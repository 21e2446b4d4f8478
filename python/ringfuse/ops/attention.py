"""Attention ops. This module so far holds decode attention over a KV cache:

- ``decode_attention(q [B, Hq, D], k_cache [B, Hkv, S_max, D], v_cache, seq_lens [B])``
- ``paged_decode_attention(q, k_pages [num_blocks, Hkv, block_size, D], v_pages,
  block_table [B, max_blocks], seq_lens)`` (vLLM's layout)

One new query token per sequence; sequence b attends to its first ``seq_lens[b]`` cached
keys (0 gives zeros). GQA: Hq is a multiple of Hkv and query head h reads kv head
h // (Hq // Hkv), with no repeat in memory. ``scale`` defaults to 1/sqrt(D); ``softcap``
(> 0) caps scores as ``softcap * tanh(s / softcap)``. Registered as
``torch.ops.ringfuse.decode_attention`` / ``paged_decode_attention`` (fake kernels for
torch.compile; inference only, no autograd).
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _C
from . import _common as c
from .rms_norm import OP_LIB

SPLIT_SIZE = 256  # keys per flash-decoding split (the kernel widens it for > 64 splits)


def _check_head_tensor(op: str, name: str, t, dim: int) -> None:
    c.check_float_tensor(op, name, t)
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a unit stride in its last (head_dim) dimension, got strides {t.stride()}")


def _check_int32(op: str, name: str, t, dim: int, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must have dtype int32, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimension(s), got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {x.device}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{op}: {name} must have a unit stride in its last dimension, got strides {t.stride()}")


def _check_common(op, q, k, v, seq_lens, scale, softcap):
    _check_head_tensor(op, "q", q, 3)
    _check_head_tensor(op, "k", k, 4)
    _check_head_tensor(op, "v", v, 4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v caches must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape[3] != d:
        raise ValueError(f"{op}: head_dim of q ({d}) and of the cache ({k.shape[3]}) differ")
    if d > 256:
        raise ValueError(f"{op}: head_dim must be <= 256, got {d}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{op}: the number of query heads ({hq}) must be a multiple of the number of kv heads ({hkv})")
    _check_int32(op, "seq_lens", seq_lens, 1, q)
    if seq_lens.shape[0] != batch:
        raise ValueError(f"{op}: seq_lens must have shape ({batch},) (one length per sequence), got {tuple(seq_lens.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not _positive(scale):
        raise ValueError(f"{op}: scale must be None or a finite number > 0, got {scale!r}")
    if softcap is None:
        softcap = 0.0
    elif not _positive(softcap):
        raise ValueError(f"{op}: softcap must be None or a finite number > 0, got {softcap!r}")
    return float(scale), float(softcap)


def _positive(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and math.isfinite(value) and value > 0)


def _out(op, out, q):
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    c.check_out(op, out, q.shape, q.dtype, q, {"q": q})
    return out


def _launch_cpu(out, q, k, v, table, block_size, seq_lens, scale, softcap):
    batch, hq, d = q.shape
    if table is None:
        blk_stride, max_blocks, block_size, num_blocks = k.stride(0), 1, k.shape[2], k.shape[0]
        v_blk_stride = v.stride(0)
        table_ptr, bt_stride = 0, 0
    else:
        blk_stride, max_blocks, num_blocks = k.stride(0), table.shape[1], k.shape[0]
        v_blk_stride = v.stride(0)
        table_ptr, bt_stride = table.data_ptr(), table.stride(0)
    _C.decode_attention(
        out.data_ptr(), out.stride(0), out.stride(1), q.data_ptr(), q.stride(0), q.stride(1),
        k.data_ptr(), blk_stride, k.stride(1), k.stride(2), v.data_ptr(), v_blk_stride, v.stride(1), v.stride(2),
        table_ptr, bt_stride, max_blocks, block_size, num_blocks, seq_lens.data_ptr(), batch, hq, k.shape[1], d,
        scale, softcap, c.DTYPE_CODE[q.dtype], SPLIT_SIZE, c.num_threads(),
    )  # fmt: skip


def decode_attention(q, k_cache, v_cache, seq_lens, *, scale=None, softcap=None, out=None):
    """softmax(q k^T * scale) v for one new token per sequence over a contiguous cache.
    q [B, Hq, D]; k_cache, v_cache [B, Hkv, S_max, D]; seq_lens [B] int32 -> [B, Hq, D]."""
    op = "decode_attention"
    scale, softcap = _check_common(op, q, k_cache, v_cache, seq_lens, scale, softcap)
    if k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: the cache holds {k_cache.shape[0]} sequences but q has {q.shape[0]}")
    if torch.compiler.is_compiling() and out is None:
        return torch.ops.ringfuse.decode_attention(q, k_cache, v_cache, seq_lens, scale, softcap)
    out = _out(op, out, q)
    _run(out, q, k_cache, v_cache, None, k_cache.shape[2], seq_lens, scale, softcap)
    return out


def paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, *, scale=None, softcap=None, out=None):
    """decode_attention over a paged cache: k_pages, v_pages [num_blocks, Hkv, block_size, D];
    block_table [B, max_blocks] int32 maps logical block i of sequence b to a physical block.
    Same data in the contiguous layout gives a bitwise identical result."""
    op = "paged_decode_attention"
    scale, softcap = _check_common(op, q, k_pages, v_pages, seq_lens, scale, softcap)
    _check_int32(op, "block_table", block_table, 2, q)
    if block_table.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: block_table must have one row per sequence ({q.shape[0]}), got {tuple(block_table.shape)}")
    if torch.compiler.is_compiling() and out is None:
        return torch.ops.ringfuse.paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, scale, softcap)
    out = _out(op, out, q)
    _run(out, q, k_pages, v_pages, block_table, k_pages.shape[2], seq_lens, scale, softcap)
    return out


def _run(out, q, k, v, table, block_size, seq_lens, scale, softcap):
    if q.shape[0] == 0:
        return
    if q.is_cuda:
        from ..kernels import attention as tk

        _check_values_on_device(q, k, table, block_size, seq_lens)
        if table is None:
            tk.decode_attention_fwd(out, q, k, v, seq_lens, scale, softcap or None)
        else:
            tk.paged_decode_attention_fwd(out, q, k, v, table, seq_lens, scale, softcap or None)
        return
    _launch_cpu(out, q, k, v, table, block_size, seq_lens, scale, softcap)


def _check_values_on_device(q, k, table, block_size, seq_lens) -> None:
    """The Triton kernels trust seq_lens and block ids: check them here (one device sync;
    the CPU kernel checks them itself before reading)."""
    capacity = block_size * (1 if table is None else table.shape[1])
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 0 or hi > capacity:
        raise ValueError(f"seq_lens must lie in [0, {capacity}] (the cache's capacity), got values in [{lo}, {hi}]")
    if table is not None and table.numel():
        used = torch.arange(table.shape[1], device=table.device)[None, :] * block_size < seq_lens[:, None].long()
        ids = table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k.shape[0]):
            raise ValueError(f"block_table holds block ids outside [0, {k.shape[0]}) in the blocks seq_lens uses")


OP_LIB.define("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale, float softcap) -> Tensor")
OP_LIB.define(
    "paged_decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor seq_lens, "
    "float scale, float softcap) -> Tensor"
)


def _decode_kernel(q, k_cache, v_cache, seq_lens, scale, softcap):
    return decode_attention(q, k_cache, v_cache, seq_lens, scale=scale, softcap=softcap or None)


def _paged_kernel(q, k_pages, v_pages, block_table, seq_lens, scale, softcap):
    return paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, scale=scale, softcap=softcap or None)


for _key in ("CPU", "CUDA"):
    OP_LIB.impl("decode_attention", _decode_kernel, _key)
    OP_LIB.impl("paged_decode_attention", _paged_kernel, _key)


@torch.library.register_fake("ringfuse::decode_attention")
def _decode_fake(q, k_cache, v_cache, seq_lens, scale, softcap):
    return q.new_empty(q.shape)


@torch.library.register_fake("ringfuse::paged_decode_attention")
def _paged_fake(q, k_pages, v_pages, block_table, seq_lens, scale, softcap):
    return q.new_empty(q.shape)
