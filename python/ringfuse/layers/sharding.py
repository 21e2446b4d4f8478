"""Where every tensor-parallel split is decided: attention heads (one GQA policy), KV heads,
the vocab, and the column / row ranges of the MLP. The runtime's models and
``distributed.parallelize`` both ask here, so a checkpoint is cut the same way everywhere.

Megatron-LM's layout: q/k/v and gate/up are column-parallel (each rank owns whole heads
and a range of FFN columns), o_proj and down_proj row-parallel (partial sums, all-reduced),
the embedding and the LM head split over the vocab in contiguous ranges.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shard:
    """What one rank holds of a named tensor: rows (``dim`` 0) or columns (``dim`` 1)
    [start, stop), or all of it (``dim`` None). The layers describe their weights as lists
    of these (``layers.attention.qkv_shards``, ``layers.mlp.gate_up_shards``, ...) and read
    them from any source with HF-named tensors that answers ``get(name, dim, start, stop)``
    and ``has(name)`` (the runtime's safetensors and GGUF readers), each rank reading only
    its slices."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def read(self, source):
        return source.get(self.name, self.dim, self.start, self.stop)


def column_parallel_shards(parts: list[tuple[str, int, int]], biased: bool) -> tuple[list[Shard], list[Shard] | None]:
    """A column-parallel (fused) projection's shards: rows [start, stop) of each part's
    ``<name>.weight``, stacked in order (q, k, v; gate, up), and the same rows of its
    ``<name>.bias`` when ``biased``."""
    weight = [Shard(f"{name}.weight", 0, start, stop) for name, start, stop in parts]
    return weight, [Shard(f"{name}.bias", 0, start, stop) for name, start, stop in parts] if biased else None


def attention_head_split(num_heads: int, num_kv_heads: int, world: int, rank: int):
    """(q heads [start, stop), kv heads [start, stop)) of this rank when tp divides the query
    heads: KV heads are split when tp divides them, else replicated (each rank keeps the one
    KV head its query heads use; tp must then be a multiple of num_kv_heads)."""
    valid = [t for t in range(1, num_heads + 1) if num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)]
    if num_heads % world or not (num_kv_heads % world == 0 or world % num_kv_heads == 0):
        raise ValueError(f"tensor-parallel size {world} does not fit {num_heads} query / {num_kv_heads} KV heads; "
                         f"valid tp sizes: {valid}")  # fmt: skip
    hq = num_heads // world
    q = (rank * hq, (rank + 1) * hq)
    if num_kv_heads % world == 0:
        hk = num_kv_heads // world
        return q, (rank * hk, (rank + 1) * hk)
    kv = q[0] // (num_heads // num_kv_heads)  # the one KV head all of this rank's query heads use
    return q, (kv, kv + 1)


def head_split(num_heads: int, num_kv_heads: int, world: int, rank: int):
    """(q heads [start, stop), kv heads [start, stop)) of this rank. With tp <= the KV
    heads, ranks take whole GQA groups (a KV head and its query heads), as evenly as they
    go: SmolLM2's 3 groups of 3 over tp = 2 are 1 + 2 groups, which keeps the GQA mapping
    uniform on each rank (9 query heads do not split in two). With more ranks than KV
    heads, the KV heads are replicated (``attention_head_split``)."""
    if world <= num_kv_heads:
        group = num_heads // num_kv_heads
        k0, k1 = rank * num_kv_heads // world, (rank + 1) * num_kv_heads // world
        return (k0 * group, k1 * group), (k0, k1)
    return attention_head_split(num_heads, num_kv_heads, world, rank)


def even_range(size: int, world: int, rank: int, what: str) -> tuple[int, int]:
    """[start, stop) of rank's equal share of ``size`` rows or columns (the FFN of a gated
    MLP, a column- or row-parallel linear): a ValueError naming ``what`` and the tp sizes
    that fit when ``world`` does not divide ``size``."""
    if size % world:
        valid = [t for t in range(1, min(size, 64) + 1) if size % t == 0]
        raise ValueError(f"{what} ({size}) must be divisible by the tensor-parallel size {world}; "
                         f"tp sizes that divide it: {valid}")  # fmt: skip
    per = size // world
    return rank * per, (rank + 1) * per


def vocab_range(vocab_size: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's vocab rows: contiguous ranges of ceil(V / tp) rows, the last
    one short (padded with -inf logits / zero rows where a fixed width is needed)."""
    per = -(-vocab_size // world)
    return min(vocab_size, rank * per), min(vocab_size, (rank + 1) * per)
