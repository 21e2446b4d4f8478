"""The vocab ends of a decoder: the token embedding and the LM head, each over this rank's
range of the vocab (``sharding.vocab_range``; the whole vocab with tp = 1).

Napkin math: the embedding reads T rows of hidden elements (a few KB per token); the LM
head is the largest matrix of a small model (SmolLM2-135M: 49152 x 576, 21 % of its
weights) and is read whole once per step, like every other linear.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .linear import Linear
from .sharding import Shard


class VocabEmbedding:
    """Rows [start, end) of the token table. ``table``: [end - start, hidden] float; or
    ``head``: an int8 ``Linear`` [end - start, hidden] whose rows are the table (a tied
    table kept once, in int8), dequantized per looked-up row to ``dtype``. ``scale``: a
    factor the rows are multiplied by (Gemma: sqrt(hidden), already rounded to dtype)."""

    def __init__(self, start: int, end: int, dtype: torch.dtype, *, table: torch.Tensor | None = None,
                 head: Linear | None = None, scale: torch.Tensor | None = None):  # fmt: skip
        if (table is None) == (head is None):
            raise ValueError("VocabEmbedding: give either table or head")
        rows = (table if table is not None else head.w_q).shape[0]
        if rows != end - start:
            raise ValueError(f"VocabEmbedding: {rows} rows for the vocab range [{start}, {end})")
        self.start, self.end, self.dtype = start, end, dtype
        self.table, self.head, self.scale = table, head, scale

    def __call__(self, ids: torch.Tensor, all_reduce: Callable | None = None, out: torch.Tensor | None = None
                 ) -> torch.Tensor:  # fmt: skip
        """ids [T] int64 -> [T, hidden] (into ``out`` [T, hidden] when given: a decode graph's
        input buffer). With ``all_reduce`` (tp > 1) ids outside this range give zero rows here
        and the sum over the ranks holds each id's row once."""
        if all_reduce is not None and self.end == self.start:  # no rows here (vocab < tp): zeros to the sum
            h = torch.zeros(ids.shape[0], self._hidden(), dtype=self.dtype, device=ids.device) if out is None \
                else out.zero_()  # fmt: skip
        else:
            local = ids - self.start if self.start else ids
            if all_reduce is not None:
                mine = (local >= 0) & (local < self.end - self.start)
                local = torch.where(mine, local, torch.zeros_like(local))
            if self.table is not None:
                h = self.table[local] if out is None else torch.index_select(self.table, 0, local, out=out)
            else:  # int8 * fp32 is computed in fp32, then rounded once to dtype (by .to or into out)
                h = torch.mul(self.head.w_q[local], self.head.w_scale[local, None], out=out)
                h = h.to(self.dtype) if out is None else h
            if all_reduce is not None:
                h *= mine[:, None].to(h.dtype)
        if all_reduce is not None:
            all_reduce(h)
        if self.scale is not None:
            h *= self.scale
        return h

    def _hidden(self) -> int:
        return (self.table if self.table is not None else self.head.w_q).shape[1]


class LMHead:
    """Logits over the whole vocab from this rank's ``linear`` [V / tp, hidden], in fp32,
    soft-capped as ``softcap * tanh(logits / softcap)`` when ``softcap`` is set (Gemma 2)."""

    def __init__(self, linear: Linear, vocab_size: int, world: int = 1, softcap: float | None = None):
        self.linear, self.vocab_size, self.world, self.softcap = linear, vocab_size, world, softcap
        self.per_rank = -(-vocab_size // world)  # the vocab padded to world * per_rank

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, V] fp32, soft-capped in place (unchanged without a cap)."""
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def __call__(self, hidden: torch.Tensor, all_gather: Callable | None = None) -> torch.Tensor:
        """[R, hidden] -> [R, vocab] fp32. ``all_gather`` (tp > 1): flat tensor -> the
        concatenation of every rank's, in rank order."""
        local = self.linear(hidden).float()  # [R, V / tp]
        if self.world == 1:
            return self.cap(local)
        if local.shape[1] < self.per_rank:  # the last rank's range is short: pad it
            local = F.pad(local, (0, self.per_rank - local.shape[1]), value=float("-inf"))
        rows = local.shape[0]  # explicit sizes: R may be 0
        full = all_gather(local.contiguous()).view(self.world, rows, self.per_rank)  # [world, R, per]
        return self.cap(full.permute(1, 0, 2).reshape(rows, self.world * self.per_rank)[:, : self.vocab_size])


def vocab_shards(name: str, start: int, end: int, block: int = 4096) -> list[Shard]:
    """Rows [start, end) of a [V, hidden] table (``sharding.vocab_range``) in blocks of
    ``block`` rows: the LM head, the largest matrix of a small model (113 MB of SmolLM2's in
    fp32), is then never whole in fp32 while it is quantized."""
    return [Shard(name, 0, r, min(r + block, end)) for r in range(start, end, block)]
