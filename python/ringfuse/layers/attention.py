"""Attention over the paged KV cache, as every model's layers run it.

Tokens of all sequences in a step are packed along one axis T (no padding):
  prefill: T = sum of prompt lengths, attention over each prompt (cu_seqlens), or over each
           prompt's whole context read back from the cache when a prefix was cached;
  decode:  T = B, one new token per sequence, attention over its pages of the KV cache.

``StepAttention`` is made once per forward pass: what the layers share (positions, slots,
block table, seq_lens) is checked there once (``ops.PagedDecodePlan`` at decode), and each
layer's call then does RoPE in place, writes its k / v to the cache and attends.

Napkin math per decode token and layer: reads the context's k and v, 2 L Hkv D elements
(L = context length), and does 4 L Hq D flops: bandwidth-bound on the KV bytes.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import ops
from .sharding import Shard, column_parallel_shards


@dataclasses.dataclass
class Step:
    """What one forward pass computes. Token-major tensors are [T]."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: where each token's k/v go in the cache
    # prefill: sequences packed along T
    cu_seqlens: torch.Tensor | None = None  # [B + 1] int32
    max_seqlen: int = 0
    # decode: one token per sequence
    block_table: torch.Tensor | None = None  # [B, max_blocks] int32
    seq_lens: torch.Tensor | None = None  # [B] int32, the new token included
    # rows of the hidden states whose logits are wanted (None: all T)
    logit_rows: torch.Tensor | None = None  # [R] int64
    # prefill over cached prefixes: every prompt's whole context, read back from the cache
    context_slots: torch.Tensor | None = None  # [Tk] int64: the cache slots of each context, packed
    cu_seqlens_context: torch.Tensor | None = None  # [B + 1] int32

    @property
    def is_prefill(self) -> bool:
        return self.cu_seqlens is not None


class KVCache:
    """Paged KV cache: per layer k, v [num_blocks, Hkv, block_size, D] (this rank's heads),
    on ``device``. Pages are allocated (not touched) up front; on the CPU untouched pages
    cost no memory."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):  # fmt: skip
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """k and v of one token in every layer."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class StepAttention:
    """Causal attention of every layer in one forward pass. ``scale``: None for 1/sqrt(D);
    ``softcap``: None, or caps each score s as softcap * tanh(s / softcap) (Gemma 2);
    ``windows``: each layer's sliding window (0: the whole context; () for none anywhere):
    a token at position i sees keys (i - window, i] (Mistral, Gemma 2's even layers).
    ``cos_sin``: the RoPE cache [max_positions, D] fp32 (neox / rotate-half style)."""

    def __init__(self, step: Step, kv: KVCache, cos_sin: torch.Tensor, num_q_heads: int, num_kv_heads: int, *,
                 scale: float | None = None, softcap: float | None = None, windows: tuple[int, ...] = ()):  # fmt: skip
        self.step, self.kv, self.cos_sin = step, kv, cos_sin
        self.hq, self.hkv, self.scale, self.softcap = num_q_heads, num_kv_heads, scale, softcap
        self.windows = tuple(w or None for w in windows) or (None,) * len(kv.k)  # per layer: ops' window=
        self.decode = self.context = None
        if step.context_slots is not None:  # (block, offset) of every context token
            self.context = (step.context_slots // kv.block_size, step.context_slots % kv.block_size)
        if not step.is_prefill:  # what the layers share, checked once per step
            self.decode = ops.PagedDecodePlan(kv.k[0], kv.v[0], cos_sin, step.positions, step.slot_mapping,
                                              step.block_table, step.seq_lens, num_q_heads, scale=scale,
                                              softcap=softcap)  # fmt: skip

    def __call__(self, qkv: torch.Tensor, layer: int) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) D]: each token's q heads, then its k heads, then its v heads
        (rotated in place). Returns the attention output [T, Hq D]."""
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]
        T, window = qkv.shape[0], self.windows[layer]
        if self.decode is not None:  # rotary, k/v into the cache, attention over the pages
            return self.decode.run_packed(qkv, k_cache, v_cache, window=window).view(T, -1)
        step, hq, hkv = self.step, self.hq, self.hkv
        heads = qkv.view(T, hq + 2 * hkv, -1)  # [T, Hq + 2 Hkv, D]
        q, k, v = heads[:, :hq], heads[:, hq : hq + hkv], heads[:, hq + hkv :]
        ops.rotary_embedding(q, k, step.positions, self.cos_sin)
        ops.write_kv(k, v, k_cache, v_cache, step.slot_mapping)
        cu_k = step.cu_seqlens
        if self.context is not None:  # cached prefixes: the whole contexts from the cache
            blk, off = self.context
            k, v, cu_k = k_cache[blk, :, off], v_cache[blk, :, off], step.cu_seqlens_context  # [Tk, Hkv, D]
        o = ops.attention_varlen(q, k, v, step.cu_seqlens, cu_k, max_seqlen_q=step.max_seqlen, causal=True,
                                 scale=self.scale, softcap=self.softcap, window=window)  # fmt: skip
        return o.view(T, -1)


# Shard specs of the attention projections (HF names under ``prefix``, e.g.
# "model.layers.3.self_attn."): this rank's q heads [q0, q1) and KV heads [k0, k1)
# (``sharding.head_split``), head_dim D.


def qkv_shards(prefix: str, q_heads: tuple[int, int], kv_heads: tuple[int, int], head_dim: int,
               biased: bool) -> tuple[list[Shard], list[Shard] | None]:  # fmt: skip
    """The fused qkv projection [(hq + 2 hkv) D, hidden]: this rank's q heads' rows, then
    its k heads', then its v heads' (column-parallel); the same rows of the biases."""
    q, kv = (q_heads[0] * head_dim, q_heads[1] * head_dim), (kv_heads[0] * head_dim, kv_heads[1] * head_dim)
    return column_parallel_shards([(f"{prefix}q_proj", *q), (f"{prefix}k_proj", *kv), (f"{prefix}v_proj", *kv)],
                                  biased)  # fmt: skip


def o_proj_shards(prefix: str, q_heads: tuple[int, int], head_dim: int, hidden: int,
                  bias_here: bool) -> tuple[list[Shard], list[Shard] | None]:  # fmt: skip
    """o_proj [hidden, hq D]: the columns of this rank's q heads (row-parallel: its output
    is a partial sum). Its bias is added by one rank only (``bias_here``), so that the
    all-reduced sum holds it once."""
    weight = [Shard(f"{prefix}o_proj.weight", 1, q_heads[0] * head_dim, q_heads[1] * head_dim)]
    return weight, [Shard(f"{prefix}o_proj.bias", 0, 0, hidden)] if bias_here else None
