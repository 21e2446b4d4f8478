"""Attention ops.

Prefill / forward (FlashAttention-2 style: tiled online softmax, no [Sq, Sk] matrix):

- ``attention(q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v, *, causal, scale, softcap,
  return_lse)``: drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=causal,
  scale=scale, enable_gqa=True)``, except that causal is bottom-right aligned when
  Sq != Sk (query i sees key j iff j <= i + Sk - Sq, as flash-attn does for chunked
  prefill; SDPA aligns top-left). A query that sees no key gets zeros and lse = -inf.
- ``attention_varlen(q [Tq, Hq, D], k [Tk, Hkv, D], v, cu_seqlens_q, cu_seqlens_k, ...)``:
  several sequences of different lengths packed along the token axis (flash-attn's
  ``flash_attn_varlen_func``): sequence b owns rows [cu[b], cu[b + 1]); lse is [Hq, Tq].

Both have autograd: the backward recomputes the forward through torch's fp32 math
(O(Sq * Sk) memory; inference is the point, training must not break).

Decode over a KV cache (flash-decoding, inference only):

- ``decode_attention(q [B, Hq, D], k_cache [B, Hkv, S_max, D], v_cache, seq_lens [B])``
- ``paged_decode_attention(q, k_pages [num_blocks, Hkv, block_size, D], v_pages,
  block_table [B, max_blocks], seq_lens)`` (vLLM's layout)

One new query token per sequence; sequence b attends to its first ``seq_lens[b]`` cached
keys (0 gives zeros), or with ``window=W`` to the last W of them.

Writing the cache:

- ``write_kv(k [T, Hkv, D], v, k_cache, v_cache, slot_mapping [T])`` stores each new token's
  K/V rows into either cache layout (contiguous [B, Hkv, S_max, D]: slot = b * S_max + pos;
  paged [num_blocks, Hkv, block_size, D]: slot = block * block_size + offset; -1 skips).

Shared: GQA/MQA, Hq a multiple of Hkv, query head h reads kv head h // (Hq // Hkv) with
no repeat in memory; D <= 256; fp32 / fp16 / bf16 with fp32 math. ``scale`` defaults to
1/sqrt(D); ``softcap`` (> 0) caps scores as ``softcap * tanh(s / softcap)``; ``window`` (an
int >= 1, causal only; Mistral's and Gemma 2's sliding window) lets query i see only keys
j > i + Sk - Sq - window, i.e. the last ``window`` keys up to its own position (HF's
``sliding_window``; flash-attn's ``window_size=(window - 1, 0)``). Registered as
``torch.ops.ringfuse.*`` with fake kernels for torch.compile.

Index values (seq_lens, block ids, slots, cu_seqlens) are checked before any memory is
touched: on CPU tensors here and in C++ (ValueError), on CUDA tensors inside the kernels,
without a sync (a bad row is zeroed or skipped; ``check_device_errors`` reports it).
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _common as c
from . import native
from .rms_norm import OP_LIB
from .rotary_embedding import STYLES, _check_memory, rotary_embedding

MAX_HEAD_DIM = 256  # the largest head_dim the CPU, Triton and CUDA attention kernels take
SPLIT_SIZE = 512  # keys per flash-decoding split (the kernel widens it for > 64 splits)


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


def _check_qkv(op, q, k, v, q_ndim, kv_ndim, pair="k and v", kv_name="k/v", layout=""):
    """q, k, v: one float dtype and device, q_ndim / kv_ndim dims with the heads on axis 1
    and head_dim last (unit stride), k and v alike, D in [1, 256], Hq a multiple of Hkv.
    ``pair`` / ``kv_name`` / ``layout`` name k and v in the errors. Returns (Hq, Hkv, D)."""
    _check_head_tensor(op, "q", q, q_ndim)
    for name, t in (("k", k), ("v", v)):
        _check_head_tensor(op, name, t, kv_ndim)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: {pair} must have the same shape{layout}, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{op}: head_dim of q ({d}) and of {kv_name} ({k.shape[-1]}) differ")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{op}: the number of query heads ({hq}) must be a multiple of the number of kv heads ({hkv})")
    return hq, hkv, d


def _check_window(op, window, causal: bool = True) -> int:
    """window (None: off) as the kernels take it: 0 = off, else the keys a query sees."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"{op}: window must be None or an int >= 1 (keys a query sees), got {window!r}")
    if not causal:
        raise ValueError(f"{op}: window needs causal=True (a sliding window looks back from each query)")
    return int(window)


def _check_common(op, q, k, v, seq_lens, scale, softcap):
    _, _, d = _check_qkv(op, q, k, v, 3, 4, pair="k and v caches", kv_name="the cache")
    batch = q.shape[0]
    _check_int32(op, "seq_lens", seq_lens, 1, q)
    if seq_lens.shape[0] != batch:
        raise ValueError(f"{op}: seq_lens must have shape ({batch},) (one length per sequence), got {tuple(seq_lens.shape)}")
    return _check_scale_softcap(op, d, scale, softcap)


def _check_scale_softcap(op, d, scale, softcap):
    """scale (None: 1/sqrt(D)) and softcap (None: off, 0.0 to the kernels) as floats."""
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


def _out(op, out, q, inputs):
    """A new output like q, or ``out`` checked against q and every input it must not alias
    (the caches, the block table and seq_lens are read while out is written)."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    c.check_out(op, out, q.shape, q.dtype, q, {"q": q})
    for name, t in inputs.items():
        if t is not None and t.numel() and out.numel() and c.overlap(out, t):
            raise ValueError(f"{op}: out overlaps {name} in memory; use a separate buffer")
    return out


def _launch_cpu(out, q, k, v, table, block_size, seq_lens, scale, softcap, window):
    batch, hq, d = q.shape
    if table is None:  # contiguous [B, Hkv, S_max, D]: block b is sequence b
        bt_stride, max_blocks, block_size = 0, 1, k.shape[2]
    else:
        bt_stride, max_blocks = table.stride(0), table.shape[1]
    native.decode_attention(out, out.stride()[:2], q, q.stride()[:2], k, k.stride()[:3], v, v.stride()[:3], table,
                            bt_stride, max_blocks, block_size, k.shape[0], seq_lens, batch, hq, k.shape[1], d, scale,
                            softcap, window, SPLIT_SIZE)  # fmt: skip


def _plain_decode(q, k, v, seq_lens, out) -> bool:
    """Whether a decode_attention call (default scale, no softcap, no window) is the common
    CPU case that every check would accept: contiguous CPU q [B >= 1, Hq, D], k and v
    [B, Hkv, S, D] in q's dtype with D in [1, 256] and Hq a multiple of Hkv, seq_lens a
    contiguous int32 [B], nothing requiring grad, and out None or a contiguous [B, Hq, D]
    tensor of q's dtype that shares no memory with them. Such a call skips the checks
    (~20 us of Python against a ~6 us kernel at decode sizes); the kernel still checks the
    seq_lens values. Anything else takes the full checks."""
    ts = (q, k, v, seq_lens)
    for t in ts:
        if type(t) is not torch.Tensor or not t.is_cpu or not t.is_contiguous() or t.requires_grad:
            return False
    if not (q.dtype in c._FLOAT_SET and k.dtype is q.dtype and v.dtype is q.dtype and seq_lens.dtype is torch.int32
            and q.dim() == 3 and k.dim() == 4 and k.shape == v.shape and seq_lens.dim() == 1):  # fmt: skip
        return False
    b, hq, d = q.shape
    hkv = k.shape[1]
    if not (b >= 1 and k.shape[0] == b and k.shape[3] == d and 1 <= d <= 256 and hkv >= 1 and hq % hkv == 0
            and seq_lens.shape[0] == b):  # fmt: skip
        return False
    if out is None:
        return True
    if not (type(out) is torch.Tensor and out.dtype is q.dtype and out.shape == q.shape and out.is_cpu
            and out.is_contiguous() and not out.requires_grad):  # fmt: skip
        return False
    o0 = out.data_ptr()
    o1 = o0 + out.nbytes
    for t in ts:
        t0 = t.data_ptr()
        if t0 < o1 and o0 < t0 + t.nbytes:
            return False
    return True


def decode_attention(q, k_cache, v_cache, seq_lens, *, scale=None, softcap=None, window=None, out=None):
    """softmax(q k^T * scale) v for one new token per sequence over a contiguous cache.
    q [B, Hq, D]; k_cache, v_cache [B, Hkv, S_max, D]; seq_lens [B] int32 -> [B, Hq, D].
    ``window``: the token sees only the last ``window`` of its keys."""
    if (scale is None and softcap is None and window is None and not torch.compiler.is_compiling()
            and _plain_decode(q, k_cache, v_cache, seq_lens, out)):  # fmt: skip
        out_given = out
        out = torch.empty(q.shape, dtype=q.dtype) if out is None else out
        _launch_cpu(out, q, k_cache, v_cache, None, k_cache.shape[2], seq_lens, 1.0 / math.sqrt(q.shape[2]), 0.0, 0)
        c.mark_written(out_given)
        return out
    op = "decode_attention"
    scale, softcap = _check_common(op, q, k_cache, v_cache, seq_lens, scale, softcap)
    window = _check_window(op, window)
    if k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: the cache holds {k_cache.shape[0]} sequences but q has {q.shape[0]}")
    if torch.compiler.is_compiling() and out is None:
        return torch.ops.ringfuse.decode_attention(q, k_cache, v_cache, seq_lens, scale, softcap, window)
    out_given = out
    out = _out(op, out, q, {"k_cache": k_cache, "v_cache": v_cache, "seq_lens": seq_lens})
    _run(out, q, k_cache, v_cache, None, k_cache.shape[2], seq_lens, scale, softcap, window)
    c.mark_written(out_given)
    return out


def paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, *, scale=None, softcap=None, window=None,
                           out=None):  # fmt: skip
    """decode_attention over a paged cache: k_pages, v_pages [num_blocks, Hkv, block_size, D];
    block_table [B, max_blocks] int32 maps logical block i of sequence b to a physical block
    (with a window, only the blocks that hold the window's keys are read or checked).
    Same data in the contiguous layout gives a bitwise identical result."""
    op = "paged_decode_attention"
    scale, softcap = _check_common(op, q, k_pages, v_pages, seq_lens, scale, softcap)
    window = _check_window(op, window)
    _check_int32(op, "block_table", block_table, 2, q)
    if block_table.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: block_table must have one row per sequence ({q.shape[0]}), got {tuple(block_table.shape)}")
    if torch.compiler.is_compiling() and out is None:
        return torch.ops.ringfuse.paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, scale, softcap,
                                                         window)  # fmt: skip
    out_given = out
    out = _out(op, out, q, {"k_pages": k_pages, "v_pages": v_pages, "block_table": block_table, "seq_lens": seq_lens})
    _run(out, q, k_pages, v_pages, block_table, k_pages.shape[2], seq_lens, scale, softcap, window)
    c.mark_written(out_given)
    return out


def _run(out, q, k, v, table, block_size, seq_lens, scale, softcap, window):
    if q.shape[0] == 0:
        return
    if q.is_cuda:
        from ..kernels import attention as tk

        # seq_lens and block ids are checked by the kernels (no sync): c.check_device_errors;
        # the rest was checked here, so the launchers' own checks are skipped
        if table is None:
            tk.decode_attention_unchecked(out, q, k, v, seq_lens, scale, softcap or None, window=window or None)
        else:
            tk.paged_decode_attention_unchecked(out, q, k, v, table, seq_lens, scale, softcap or None,
                                                window=window or None)  # fmt: skip
        c.after_launch(q.device)
        return
    _launch_cpu(out, q, k, v, table, block_size, seq_lens, scale, softcap, window)


OP_LIB.define(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale, float softcap, "
    "int window=0) -> Tensor"
)
OP_LIB.define(
    "paged_decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor seq_lens, "
    "float scale, float softcap, int window=0) -> Tensor"
)


def _decode_kernel(q, k_cache, v_cache, seq_lens, scale, softcap, window=0):
    return decode_attention(q, k_cache, v_cache, seq_lens, scale=scale, softcap=softcap or None, window=window or None)


def _paged_kernel(q, k_pages, v_pages, block_table, seq_lens, scale, softcap, window=0):
    return paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, scale=scale, softcap=softcap or None,
                                  window=window or None)  # fmt: skip


for _key in ("CPU", "CUDA"):
    OP_LIB.impl("decode_attention", _decode_kernel, _key)
    OP_LIB.impl("paged_decode_attention", _paged_kernel, _key)


@torch.library.register_fake("ringfuse::decode_attention")
def _decode_fake(q, k_cache, v_cache, seq_lens, scale, softcap, window=0):
    return q.new_empty(q.shape)


@torch.library.register_fake("ringfuse::paged_decode_attention")
def _paged_fake(q, k_pages, v_pages, block_table, seq_lens, scale, softcap, window=0):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------
# Prefill: attention / attention_varlen


def _check_attention_out(op, out, q, k, v):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"{op}: out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}), got "
                         f"{tuple(out.shape)}, {out.dtype}, {out.device}")  # fmt: skip
    if out.numel() and out.shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"{op}: out must have a unit stride in its last dimension, got strides {out.stride()}")
    if c.needs_autograd(out, q, k, v):
        raise ValueError(f"{op}: out= does not support autograd; call without out= when inputs require grad")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if out.numel() and t.numel() and c.overlap(out, t):
            raise ValueError(f"{op}: out overlaps {name}; attention cannot run in place")


def _new_lse(shape, q):
    return torch.empty(shape, dtype=torch.float32, device=q.device)


def _attention_forward(q, k, v, causal, scale, softcap, window=0, out=None):
    """Validated 4D forward: returns (out [B, Hq, Sq, D], lse [B, Hq, Sq] fp32)."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _new_lse(q.shape[:3], q)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if out.numel() == 0:
        return out, lse
    if q.is_cuda:
        from ..kernels import attention as tk

        tk.flash_attention_fwd(out, q, k, v, scale, causal, softcap or None, lse=lse, window=window or None)
        return out, lse
    native.attention(out, out.stride()[:3], lse, lse.stride(), q, q.stride()[:3], k, k.stride()[:3], v,
                     v.stride()[:3], None, None, B, Sq, Sk, Hq, Hkv, D, bool(causal), scale, softcap, window)  # fmt: skip
    return out, lse


def attention(q, k, v, *, causal: bool = False, scale=None, softcap=None, window=None, return_lse: bool = False,
              out=None):  # fmt: skip
    """softmax(scale * q k^T [softcapped] [causal] [windowed]) v without materializing the scores.

    q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D] -> [B, Hq, Sq, D] (and lse [B, Hq, Sq] fp32 with
    ``return_lse=True``: natural log of the softmax denominator, for merging partial
    attentions). Causal is bottom-right aligned. ``out=`` writes into a preallocated tensor
    (no autograd).
    """
    op = "attention"
    _check_qkv(op, q, k, v, 4, 4, layout=" [B, H, S, D]")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: q has batch {q.shape[0]} but k/v have {k.shape[0]}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    scale, softcap = _check_scale_softcap(op, q.shape[-1], scale, softcap)
    window = _check_window(op, window, causal)
    if out is not None:
        _check_attention_out(op, out, q, k, v)
        result = _attention_forward(q, k, v, causal, scale, softcap, window, out)
        c.mark_written(out)
    elif torch.compiler.is_compiling() or c.needs_autograd(q, k, v):
        result = torch.ops.ringfuse.attention(q, k, v, causal, scale, softcap, window)
    else:
        result = _attention_forward(q, k, v, causal, scale, softcap, window)
    return result if return_lse else result[0]


def _check_cu_k(op, cu_k, cu_q, q):
    _check_int32(op, "cu_seqlens_k", cu_k, 1, q)
    if cu_k.shape != cu_q.shape:
        raise ValueError(f"{op}: cu_seqlens_k must have cu_seqlens_q's shape {tuple(cu_q.shape)} (B + 1 offsets), "
                         f"got {tuple(cu_k.shape)}")  # fmt: skip


def _check_cu_values(op, cu_q, cu_k, tq, tk):
    """Offsets start at 0, never decrease and stay inside the packed tensors: checked here
    on CPU tensors (the CPU kernel re-checks them before reading), by the kernel on CUDA
    (no sync; see check_device_errors)."""
    if cu_q.is_cuda:
        return
    for name, cu, total in (("cu_seqlens_q", cu_q, tq), ("cu_seqlens_k", cu_k, tk)):
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > total:
            raise ValueError(f"{op}: {name} must start at 0, never decrease and end at most at {total} "
                             f"(the packed length), got {cu.tolist()}")  # fmt: skip


def _varlen_forward(q, k, v, cu_q, cu_k, max_seqlen_q, causal, scale, softcap, window=0, out=None):
    """Validated varlen forward: returns (out [Tq, Hq, D], lse [Hq, Tq] fp32)."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    lse = _new_lse((Hq, Tq), q)
    batch = cu_q.shape[0] - 1
    if out.numel() == 0 or batch == 0:
        out.zero_()
        lse.fill_(-math.inf)
        return out, lse
    if q.is_cuda:
        from ..kernels import attention as tk

        # rows the kernel does not write (past cu_q[-1], or of a sequence with bad offsets)
        # read as the CPU's do: zeros, lse -inf (a memset: no sync to find them)
        out.zero_()
        lse.fill_(-math.inf)
        tk.flash_attention_varlen_fwd(out, q, k, v, cu_q, cu_k, max_seqlen_q, scale, causal, softcap or None, lse=lse,
                                      window=window or None)  # fmt: skip
        c.after_launch(q.device)
        return out, lse
    # rows outside every sequence (cu_q[-1] < Tq) are not attention outputs: zeros
    if int(cu_q[-1]) < Tq:
        out[int(cu_q[-1]):].zero_()
        lse[:, int(cu_q[-1]):] = -math.inf
    # [T, H, D] rows as one batch of packed positions: strides (0, head, token)
    native.attention(out, (0, out.stride(1), out.stride(0)), lse, (0, lse.stride(0), lse.stride(1)), q,
                     (0, q.stride(1), q.stride(0)), k, (0, k.stride(1), k.stride(0)), v, (0, v.stride(1), v.stride(0)),
                     cu_q, cu_k, batch, Tq, Tk, Hq, Hkv, D, bool(causal), scale, softcap, window)  # fmt: skip
    return out, lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, causal: bool = False,
                     scale=None, softcap=None, window=None, return_lse: bool = False, out=None):
    """``attention`` over sequences packed along the token axis, as flash-attn's varlen API.

    q [Tq, Hq, D]; k, v [Tk, Hkv, D]; cu_seqlens_q / cu_seqlens_k [B + 1] int32 offsets
    (sequence b: queries cu_seqlens_q[b]:cu_seqlens_q[b + 1], keys likewise) ->
    [Tq, Hq, D] (and lse [Hq, Tq] fp32). Causal is bottom-right aligned per sequence.
    ``max_seqlen_q`` (the longest query run) saves a device sync on CUDA; it is computed
    when None.
    """
    op = "attention_varlen"
    _check_qkv(op, q, k, v, 3, 3, layout=" [T, H, D]")
    _check_int32(op, "cu_seqlens_q", cu_seqlens_q, 1, q)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens_q must hold at least one offset (B + 1 >= 1)")
    _check_cu_k(op, cu_seqlens_k, cu_seqlens_q, q)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    scale, softcap = _check_scale_softcap(op, q.shape[-1], scale, softcap)
    window = _check_window(op, window, causal)
    if max_seqlen_q is not None and (isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int)
                                     or max_seqlen_q < 0):  # fmt: skip
        raise ValueError(f"{op}: max_seqlen_q must be None or an int >= 0, got {max_seqlen_q!r}")
    max_q = -1 if max_seqlen_q is None else max_seqlen_q
    if out is None and (torch.compiler.is_compiling() or c.needs_autograd(q, k, v)):
        result = torch.ops.ringfuse.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, causal, scale,
                                                     softcap, window)  # fmt: skip
    else:
        if out is not None:
            _check_attention_out(op, out, q, k, v)
        result = _varlen_checked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, causal, scale, softcap, window, out)
        c.mark_written(out)
    return result if return_lse else result[0]


OP_LIB.define(
    "attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, float softcap, int window=0) -> (Tensor, Tensor)"
)
OP_LIB.define(
    "attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "bool causal, float scale, float softcap, int window=0) -> (Tensor, Tensor)"
)


def _attention_kernel(q, k, v, causal, scale, softcap, window=0):
    return _attention_forward(q, k, v, causal, scale, softcap, window)


def _varlen_checked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale, softcap, window=0, out=None):
    """The offsets' values checked (CPU) and on CUDA max_seqlen_q, -1 = unknown, bounded by
    Tq (computing it would be a sync), then the forward: the one eager path, also the
    dispatcher's kernel."""
    _check_cu_values("attention_varlen", cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    if q.is_cuda and max_seqlen_q < 0:
        max_seqlen_q = q.shape[0]
    return _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale, softcap, window, out)


for _key in ("CPU", "CUDA"):
    OP_LIB.impl("attention", _attention_kernel, _key)
    OP_LIB.impl("attention_varlen", _varlen_checked, _key)


@torch.library.register_fake("ringfuse::attention")
def _attention_fake(q, k, v, causal, scale, softcap, window=0):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("ringfuse::attention_varlen")
def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale, softcap, window=0):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def attention_math(q, k, v, causal, scale, softcap, window=0):
    """The forward in fp32 torch math with an [Sq, Sk] score matrix (the backward's
    recompute path): q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D] -> fp32 [B, Hq, Sq, D]."""
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        if window:  # and key j > i + sk - sq - window
            keep &= ~torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq - window)
        s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows without a visible key: zeros
    return torch.matmul(p, vf)


def _math_grads(q, k, v, grad_out, causal, scale, softcap, window):
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = attention_math(qq, kk, vv, causal, scale, softcap, window)
        return torch.autograd.grad(o, (qq, kk, vv), grad_out.float())


def _setup_attention(ctx, inputs, output):
    q, k, v, causal, scale, softcap, *window = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (causal, scale, softcap, window[0] if window else 0)


def _backward_attention(ctx, grad_out, grad_lse):
    q, k, v = ctx.saved_tensors
    gq, gk, gv = _math_grads(q, k, v, grad_out, *ctx.args)
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None, None


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, _, causal, scale, softcap, *window = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k)
    ctx.args = (causal, scale, softcap, window[0] if window else 0)


def _backward_varlen(ctx, grad_out, grad_lse):
    q, k, v, cu_q, cu_k = ctx.saved_tensors
    gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[b : b + 2], bounds_k[b : b + 2]
        if q1 == q0 or k1 == k0:
            continue
        # [T, H, D] slices as [1, H, T, D]
        grads = _math_grads(*(t[None].transpose(1, 2) for t in (q[q0:q1], k[k0:k1], v[k0:k1])),
                            grad_out[q0:q1][None].transpose(1, 2), *ctx.args)  # fmt: skip
        gq[q0:q1], gk[k0:k1], gv[k0:k1] = (g[0].transpose(0, 1) for g in grads)
    return gq, gk, gv, None, None, None, None, None, None, None


torch.library.register_autograd("ringfuse::attention", _backward_attention, setup_context=_setup_attention)
torch.library.register_autograd("ringfuse::attention_varlen", _backward_varlen, setup_context=_setup_varlen)


# ---------------------------------------------------------------------------------------
# write_kv


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Store new keys/values k, v [T, Hkv, D] into k_cache / v_cache, in place.

    The caches are [num_blocks, Hkv, block_size, D] (paged) or [B, Hkv, S_max, D]
    (contiguous, i.e. block_size = S_max): token t goes to block slot // block_size,
    position slot % block_size, with slot = slot_mapping[t] (int64 or int32 [T]); -1 skips
    the token (padding). A slot named twice holds the last such token's row.
    """
    op = "write_kv"
    for name, t in (("k", k), ("v", v)):
        _check_head_tensor(op, name, t, 3)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_head_tensor(op, name, t, 4)
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != k.dtype:
            raise TypeError(f"{op}: {name} must have k's dtype {k.dtype}, got {t.dtype}")
        if t.device != k.device:
            raise ValueError(f"{op}: {name} is on {t.device} but k is on {k.device}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: k and v must have the same shape [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")  # fmt: skip
    T, hkv, d = k.shape
    if (k_cache.shape[1], k_cache.shape[3]) != (hkv, d):
        raise ValueError(f"{op}: the cache must be [blocks, {hkv}, block_size, {d}] to hold k [T, {hkv}, {d}], "
                         f"got {tuple(k_cache.shape)}")  # fmt: skip
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: slot_mapping must be an int64 or int32 tensor, got "
                        f"{slot_mapping.dtype if isinstance(slot_mapping, torch.Tensor) else type(slot_mapping).__name__}")
    if slot_mapping.shape != (T,):
        raise ValueError(f"{op}: slot_mapping must have shape ({T},) (one slot per token), got {tuple(slot_mapping.shape)}")
    if slot_mapping.device != k.device:
        raise ValueError(f"{op}: slot_mapping is on {slot_mapping.device} but k is on {k.device}")
    if c.needs_autograd(k, v, k_cache, v_cache):
        raise ValueError(f"{op}: the caches are written in place, which autograd cannot follow (an input requires "
                         "grad); write them under torch.no_grad()")  # fmt: skip
    if torch.compiler.is_compiling():
        torch.ops.ringfuse.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    if k.numel() and k_cache.numel():  # spans taken once each
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if c.rows_overlap(t):
                raise ValueError(f"{op}: {name}'s rows overlap in memory (strides {t.stride()}, e.g. an expanded "
                                 "tensor): slots written there would overwrite each other")  # fmt: skip
        caches = (("k_cache", c.span(k_cache)), ("v_cache", c.span(v_cache)))
        if c.spans_overlap(*(span for _, span in caches)):
            raise ValueError(f"{op}: k_cache and v_cache overlap in memory")
        for name, t in (("k", k), ("v", v)):
            ts = c.span(t)
            for cname, cs in caches:
                if c.spans_overlap(ts, cs):
                    raise ValueError(f"{op}: {name} overlaps {cname}")
    _write_kv(k, v, k_cache, v_cache, slot_mapping)
    c.mark_written(k_cache, v_cache)


def _write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    T, hkv, d = k.shape
    if T == 0:
        return
    slots = slot_mapping.to(torch.int64).contiguous()
    num_blocks, _, block_size, _ = k_cache.shape
    if k.is_cuda:  # the kernel checks the slots (no sync): c.check_device_errors
        from ..kernels import attention as tk

        tk.write_kv_fwd(k_cache, v_cache, k, v, slots, block_size)
        c.after_launch(k.device)
        return
    if num_blocks * block_size == 0:  # the CPU kernel checks the slots, given a slot
        lo, hi = int(slots.min()), int(slots.max())
        if lo < -1 or hi >= num_blocks * block_size:
            raise ValueError(f"write_kv: slot_mapping must lie in [-1, {num_blocks * block_size}) (the cache's "
                             f"slots; -1 skips), got values in [{lo}, {hi}]")  # fmt: skip
        return  # every token skipped
    native.write_kv(k_cache, k_cache.stride()[:3], v_cache, v_cache.stride()[:3], k, k.stride()[:2], v,
                    v.stride()[:2], slots, T, hkv, d, num_blocks, block_size)  # fmt: skip


OP_LIB.define("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()")
for _key in ("CPU", "CUDA"):
    OP_LIB.impl("write_kv", _write_kv, _key)


@torch.library.register_fake("ringfuse::write_kv")
def _write_kv_fake(k, v, k_cache, v_cache, slot_mapping):
    return None


# ---------------------------------------------------------------------------------------
# Decode step plan: rotary + write_kv + paged decode attention, checked once per step


class PagedDecodePlan:
    """One decode step of every layer over a paged KV cache, split as FlashInfer splits it:
    ``plan = PagedDecodePlan(...)`` checks what all layers share (positions, slots, block
    table, seq_lens, the cos/sin cache, the caches' layout) once per step; ``plan.run(q, k,
    v, k_pages, v_pages)`` per layer then does what ``rotary_embedding(q, k, ...)``,
    ``write_kv(k, v, k_pages, v_pages, slot_mapping)`` and ``paged_decode_attention(q,
    k_pages, v_pages, block_table, seq_lens)`` do, with the same bits, checking only its own
    tensors (a decode step at batch 1 is ~90% Python glue otherwise: ~50 us of checks per
    layer against ~10 us of kernels).

    ``k_pages`` / ``v_pages``: any layer's caches [num_blocks, Hkv, block_size, D] (each
    run's must have the same shape, strides and dtype); q [B, Hq, D], k / v [B, Hkv, D];
    positions / slot_mapping [B] int64 or int32; block_table [B, max_blocks] and seq_lens
    [B] int32 (the new token counted); ``scale`` and ``softcap`` as paged_decode_attention's,
    and ``window`` too, given per run (per layer: Gemma 2 alternates sliding-window and
    global layers).
    On CUDA each run launches the ops' Triton kernels without the ops' checks, as the CPU
    runs call the C++ kernels."""

    def __init__(self, k_pages, v_pages, cos_sin_cache, positions, slot_mapping, block_table, seq_lens,
                 num_q_heads: int, *, scale=None, softcap=None, style: str = "neox"):  # fmt: skip
        op = "PagedDecodePlan"
        if style not in STYLES:
            raise ValueError(f"{op}: style must be one of {STYLES}, got {style!r}")
        if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads < 1:
            raise ValueError(f"{op}: num_q_heads must be a positive int, got {num_q_heads!r}")
        for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
            _check_head_tensor(op, name, t, 4)
        if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype or v_pages.device != k_pages.device:
            raise ValueError(f"{op}: v_pages must match k_pages (shape {tuple(k_pages.shape)}, {k_pages.dtype}, "
                             f"{k_pages.device}), got {tuple(v_pages.shape)}, {v_pages.dtype}, {v_pages.device}")  # fmt: skip
        num_blocks, hkv, block_size, d = k_pages.shape
        _check_int32(op, "block_table", block_table, 2, k_pages)
        batch = block_table.shape[0]
        rows = {name: t.shape[0] for name, t in (("block_table", block_table), ("seq_lens", seq_lens),
                                                  ("positions", positions), ("slot_mapping", slot_mapping))
                if isinstance(t, torch.Tensor) and t.dim() >= 1}  # fmt: skip
        if len(set(rows.values())) > 1:
            raise ValueError(f"{op}: block_table, seq_lens, positions and slot_mapping must have one row per sequence, "
                             f"got {', '.join(f'{n} {r}' for n, r in rows.items())}")  # fmt: skip
        # the checks the three ops make, once: q/k/v and caches, the integer tensors, rotary's cache
        q_probe = k_pages.new_empty(batch, num_q_heads, d)
        self.scale, self.softcap = _check_common(op, q_probe, k_pages, v_pages, seq_lens, scale, softcap)
        for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{op}: {name} must be an int64 or int32 tensor")
            if t.shape != (batch,):
                raise ValueError(f"{op}: {name} must have shape ({batch},) (one per sequence), got {tuple(t.shape)}")
            if t.device != k_pages.device:
                raise ValueError(f"{op}: {name} is on {t.device} but the cache is on {k_pages.device}")
        if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2:
            raise TypeError(f"{op}: cos_sin_cache must be a float32 [max_positions, rot_dim] tensor")
        rot_dim = cos_sin_cache.shape[1]
        if rot_dim < 2 or rot_dim % 2 or rot_dim > d:
            raise ValueError(f"{op}: cos_sin_cache's rot_dim must be even and <= head_dim {d}, got {rot_dim}")
        if cos_sin_cache.device != k_pages.device:
            raise ValueError(f"{op}: cos_sin_cache is on {cos_sin_cache.device} but the cache is on {k_pages.device}")
        self.cuda = k_pages.is_cuda
        self.gptj = style == "gptj"
        self.style = style
        self.batch, self.hq, self.hkv, self.d = batch, num_q_heads, hkv, d
        self.num_blocks, self.block_size = num_blocks, block_size
        self.cache_layout = (k_pages.shape, k_pages.stride(), k_pages.dtype, k_pages.device)
        self.positions, self.slot_mapping, self.block_table, self.seq_lens = positions, slot_mapping, block_table, seq_lens
        self.cos_sin_cache = cos_sin_cache
        self._cache_bytes = k_pages.nbytes if k_pages.is_contiguous() else None
        # kernel arguments shared by every layer
        self._pos = positions.to(torch.int64).contiguous()
        self._slots = slot_mapping.to(torch.int64).contiguous()
        cs = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
        self._cs = cs
        self._rope = (self._pos, cs, cs.stride(0), cs.shape[0], cs.shape[1], self.gptj)
        self._table = (block_table, block_table.stride(0), block_table.shape[1], block_size, num_blocks, seq_lens)
        self._cache_strides = k_pages.stride()[:3]  # v_pages: the same layout
        # tensors whose pointers the kernels get: one swapped or resized (its memory maybe
        # freed) is refused at the next run; private copies follow in-place writes to their source
        self._pointed = (self._pos, self._slots, cs, block_table, seq_lens)
        self._ptrs = tuple(t.data_ptr() for t in self._pointed)
        self._held = tuple(t.untyped_storage() for t in self._pointed)  # no freed address can come back
        self._copies = tuple((src, dst) for src, dst in ((positions, self._pos), (slot_mapping, self._slots),
                                                         (cos_sin_cache, cs)) if dst is not src)  # fmt: skip
        self._copies_watch = c.Watch(src for src, _ in self._copies)
        # the kernels directly (else the three ops): contiguous caches with a slot, tokens
        self._direct = self._cache_bytes is not None and batch > 0 and num_blocks * block_size > 0
        self._elem = k_pages.element_size()

    def run_packed(self, qkv, k_pages, v_pages, *, window=None):
        """``run`` on the fused q/k/v projection as a model computes it: qkv [B, (Hq + 2 Hkv) D]
        holds each token's q heads, then its k heads, then its v heads (no views to build)."""
        op = "PagedDecodePlan.run_packed"
        b, d, hq, hkv = self.batch, self.d, self.hq, self.hkv
        width = (hq + 2 * hkv) * d
        if type(qkv) is not torch.Tensor or qkv.shape != (b, width):
            raise ValueError(f"{op}: qkv must be a tensor of shape {(b, width)} ([B, (Hq + 2 Hkv) D]), got "
                             f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")  # fmt: skip
        st = qkv.stride()
        if not self._direct or st[1] != 1 or (b > 1 and st[0] < width):
            heads = qkv.view(b, hq + 2 * hkv, d) if st[1] == 1 else qkv.reshape(b, hq + 2 * hkv, d)
            return self.run(heads[:, :hq], heads[:, hq : hq + hkv], heads[:, hq + hkv :], k_pages, v_pages,
                            window=window)  # fmt: skip
        if qkv.dtype != self.cache_layout[2] or qkv.device != self.cache_layout[3]:
            raise TypeError(f"{op}: qkv must be {self.cache_layout[2]} on {self.cache_layout[3]} like the cache, got "
                            f"{qkv.dtype} on {qkv.device}")  # fmt: skip
        window = _check_window(op, window)
        kp, vp = self._pages(op, k_pages, v_pages)
        self._refuse_autograd(op, qkv, k_pages, v_pages)
        qx = qkv.data_ptr()
        self._no_alias(op, "qkv", qx, qx + ((b - 1) * st[0] + width) * self._elem, kp, vp)
        rows = (st[0], d)  # (token, head) strides of q, k and v inside qkv
        out = self._launch(qkv, 0, rows, qkv, hq * d, rows, qkv, (hq + hkv) * d, rows, k_pages, v_pages, window)
        c.mark_written(qkv, k_pages, v_pages)  # as the three ops would
        return out

    def run(self, q, k, v, k_pages, v_pages, *, window=None):
        """Rotates q and k in place, writes k and v to their slots, returns attention [B, Hq, D]
        (over the last ``window`` keys with a window)."""
        op = "PagedDecodePlan.run"
        dtype, device = self.cache_layout[2], self.cache_layout[3]
        for name, t, heads in (("q", q, self.hq), ("k", k, self.hkv), ("v", v, self.hkv)):
            if type(t) is not torch.Tensor or t.shape != (self.batch, heads, self.d):
                raise ValueError(f"{op}: {name} must be a tensor of shape {(self.batch, heads, self.d)}, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")  # fmt: skip
            if t.dtype != dtype or t.device != device:
                raise TypeError(f"{op}: {name} must be {dtype} on {device} like the cache, got {t.dtype} on {t.device}")
        window = _check_window(op, window)
        kp, vp = self._pages(op, k_pages, v_pages)
        qs, ks, vs = q.stride(), k.stride(), v.stride()
        if self.d > 1 and (qs[2] != 1 or ks[2] != 1 or vs[2] != 1):
            raise ValueError(f"{op}: q, k and v must have a unit stride in their last (head_dim) dimension")
        _check_memory(op, q, k)  # as rotary_embedding: q and k are rotated in place
        if not self._direct:  # the three ops check and mark their writes
            rotary_embedding(q, k, self.positions, self.cos_sin_cache, style=self.style)
            write_kv(k, v, k_pages, v_pages, self.slot_mapping)
            return paged_decode_attention(q, k_pages, v_pages, self.block_table, self.seq_lens, scale=self.scale,
                                          softcap=self.softcap or None, window=window or None)  # fmt: skip
        self._refuse_autograd(op, q, k, v, k_pages, v_pages)
        b, d, hq, hkv = self.batch, self.d, self.hq, self.hkv
        qx, kx, vx = q.data_ptr(), k.data_ptr(), v.data_ptr()
        for name, start, st, heads in (("q", qx, qs, hq), ("k", kx, ks, hkv), ("v", vx, vs, hkv)):
            end = start + (1 + (b - 1) * st[0] + (heads - 1) * st[1] + d - 1) * self._elem
            self._no_alias(op, name, start, end, kp, vp)
        out = self._launch(q, 0, qs[:2], k, 0, ks[:2], v, 0, vs[:2], k_pages, v_pages, window)
        c.mark_written(q, k, k_pages, v_pages)  # as the three ops would
        return out

    def _pages(self, op, k_pages, v_pages) -> tuple[int, int]:
        """Checks that this run's caches have the planned layout and the planned buffers are
        where they were; the caches' data pointers."""
        if tuple(t.data_ptr() for t in self._pointed) != self._ptrs:
            raise ValueError(f"{op}: positions, slot_mapping, block_table, seq_lens or cos_sin_cache was resized "
                             "or swapped since the plan was made: make a new PagedDecodePlan")  # fmt: skip
        if self._copies and self._copies_watch.changed():
            for src, dst in self._copies:  # written in place since: refresh the private copies
                dst.copy_(src)
            self._copies_watch = c.Watch(src for src, _ in self._copies)
        for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
            if type(t) is not torch.Tensor or (t.shape, t.stride(), t.dtype, t.device) != self.cache_layout:
                raise ValueError(f"{op}: {name} must have the planned cache's shape, strides, dtype and device "
                                 f"{self.cache_layout}")  # fmt: skip
        return k_pages.data_ptr(), v_pages.data_ptr()

    @staticmethod
    def _refuse_autograd(op, *tensors) -> None:
        """A direct run rotates q and k and writes the caches in place (v is copied into its
        cache): autograd cannot follow that."""
        if c.needs_autograd(*tensors):
            raise ValueError(f"{op}: q and k are rotated and the caches written in place, which autograd cannot "
                             "follow (an input requires grad); run under torch.no_grad()")  # fmt: skip

    def _no_alias(self, op, name, start, end, kp, vp) -> None:
        """The new rows [start, end) (bytes) must not alias the caches they go to."""
        for cname, p in (("k_pages", kp), ("v_pages", vp)):
            if start < p + self._cache_bytes and p < end:
                raise ValueError(f"{op}: {name} overlaps {cname}")

    def _launch(self, q, q_off, qs, k, k_off, ks, v, v_off, vs, k_pages, v_pages, window):
        """The kernels on checked tensors: q [B, Hq, D], k and v [B, Hkv, D] start *_off
        elements into q / k / v (one qkv tensor for run_packed), with (token, head) strides
        qs / ks / vs."""
        if self.cuda:
            return self._launch_cuda(q, q_off, qs, k, k_off, ks, v, v_off, vs, k_pages, v_pages, window)
        b, d, hq, hkv = self.batch, self.d, self.hq, self.hkv
        native.rotary_embedding(q, qs[0], qs[1], b, hq, d, *self._rope, q_off)  # q in place
        native.rotary_embedding(k, ks[0], ks[1], b, hkv, d, *self._rope, k_off)  # k in place
        cs = self._cache_strides
        native.write_kv(k_pages, cs, v_pages, cs, k, ks, v, vs, self._slots, b, hkv, d, self.num_blocks,
                        self.block_size, k_off, v_off)  # fmt: skip
        out = torch.empty((b, hq, d), dtype=self.cache_layout[2])  # [B, Hq, D], contiguous
        native.decode_attention(out, (hq * d, d), q, qs, k_pages, cs, v_pages, cs, *self._table, b, hq, hkv, d,
                                self.scale, self.softcap, window, SPLIT_SIZE, q_off)  # fmt: skip
        return out

    def _launch_cuda(self, q, q_off, qs, k, k_off, ks, v, v_off, vs, k_pages, v_pages, window):
        """_launch on CUDA: the Triton kernels the three ops run, without their checks (the
        plan made them), on [B, H, D] views of q, k and v. The kernels check positions,
        slots, seq_lens and block ids (check_device_errors)."""
        from ..kernels import attention as tk
        from ..kernels import rotary_embedding as tr

        b, d, hq, hkv = self.batch, self.d, self.hq, self.hkv
        q, k, v = (t.as_strided((b, heads, d), (st[0], st[1], 1), t.storage_offset() + off)
                   for t, off, st, heads in ((q, q_off, qs, hq), (k, k_off, ks, hkv), (v, v_off, vs, hkv)))  # fmt: skip
        for x in (q, k):  # in place
            tr.rotary_embedding_fwd(x, self._pos, self._cs, self.gptj)
        tk.write_kv_fwd(k_pages, v_pages, k, v, self._slots, self.block_size)
        out = torch.empty((b, hq, d), dtype=self.cache_layout[2], device=q.device)  # [B, Hq, D], contiguous
        tk.paged_decode_attention_unchecked(out, q, k_pages, v_pages, self.block_table, self.seq_lens, self.scale,
                                            self.softcap or None, window=window or None)  # fmt: skip
        c.after_launch(q.device)
        return out
