"""ringfuse.layers.sharding, the one home of tensor-parallel splits, by its definitions:
the ranks' ranges partition what they split, in rank order; heads go by whole GQA groups
(each rank's query heads use only its KV heads); KV heads are replicated past their count;
sizes that cannot be split are refused with the tp sizes that fit."""

from __future__ import annotations

import pytest

from ringfuse.layers import attention_head_split, even_range, head_split, vocab_range

HEAD_SHAPES = [(9, 3), (32, 8), (32, 32), (4, 1), (12, 4), (16, 2), (15, 5)]


def _worlds(heads, kv_heads):
    return [w for w in range(1, heads + 1) if heads % w == 0 or w <= kv_heads]


@pytest.mark.parametrize("heads,kv_heads", HEAD_SHAPES)
def test_head_split_partitions_by_whole_groups(heads, kv_heads):
    group = heads // kv_heads
    for world in _worlds(heads, kv_heads):
        try:
            splits = [head_split(heads, kv_heads, world, r) for r in range(world)]
        except ValueError:
            assert world > kv_heads  # only the replicated case may not fit
            continue
        q_ranges = [q for q, _ in splits]
        assert q_ranges[0][0] == 0 and q_ranges[-1][1] == heads
        assert all(a[1] == b[0] for a, b in zip(q_ranges, q_ranges[1:])), (heads, kv_heads, world)
        for (q0, q1), (k0, k1) in splits:
            assert q1 > q0 and k1 > k0
            # every query head of the rank uses a KV head of the rank (HF's h // group)
            assert all(k0 <= h // group < k1 for h in range(q0, q1)), (heads, kv_heads, world)
            assert (q1 - q0) % (k1 - k0) == 0  # a uniform GQA mapping on the rank
        if world <= kv_heads:  # KV heads partitioned too, whole groups per rank
            kv_ranges = [k for _, k in splits]
            assert kv_ranges[0][0] == 0 and kv_ranges[-1][1] == kv_heads
            assert all(a[1] == b[0] for a, b in zip(kv_ranges, kv_ranges[1:]))
            assert all(q == (k[0] * group, k[1] * group) for q, k in zip(q_ranges, kv_ranges))
            sizes = [k1 - k0 for k0, k1 in kv_ranges]
            assert max(sizes) - min(sizes) <= 1  # as evenly as they go


def test_smollm2_heads_on_two_ranks():
    """9 query heads in 3 GQA groups over tp = 2: one group and two groups."""
    assert head_split(9, 3, 2, 0) == ((0, 3), (0, 1))
    assert head_split(9, 3, 2, 1) == ((3, 9), (1, 3))


def test_kv_heads_replicated_past_their_count():
    # 8 query heads, 2 KV heads, tp 4: each rank 2 query heads and the one KV head they use
    assert [head_split(8, 2, 4, r) for r in range(4)] == [((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)),
                                                         ((6, 8), (1, 2))]  # fmt: skip


@pytest.mark.parametrize("heads,kv_heads,world", [(9, 3, 4), (32, 8, 3), (12, 4, 8)])
def test_unsplittable_heads_are_refused(heads, kv_heads, world):
    """attention_head_split needs tp to divide the query heads; head_split takes uneven
    whole groups up to the KV heads' count (32 / 8 on 3 ranks: 2 + 3 + 3 groups) and only
    past it needs that."""
    with pytest.raises(ValueError, match=rf"tensor-parallel size {world} does not fit {heads} query / {kv_heads} KV "
                                         r"heads; valid tp sizes: \[1, "):  # fmt: skip
        attention_head_split(heads, kv_heads, world, 0)
    if world > kv_heads:
        with pytest.raises(ValueError, match="does not fit"):
            head_split(heads, kv_heads, world, 0)
    else:
        assert [head_split(heads, kv_heads, world, r)[1] for r in range(world)] == [(0, 2), (2, 5), (5, 8)]


@pytest.mark.parametrize("size,world", [(1536, 1), (1536, 2), (1536, 3), (96, 4), (7, 7)])
def test_even_range_partitions(size, world):
    ranges = [even_range(size, world, r, "FFN size") for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert {b - a for a, b in ranges} == {size // world}


def test_even_range_refuses_with_the_sizes_that_fit():
    with pytest.raises(ValueError, match=r"ffn size \(7\) must be divisible by the tensor-parallel size 2; tp sizes "
                                         r"that divide it: \[1, 7\]"):  # fmt: skip
        even_range(7, 2, 0, "ffn size")
    with pytest.raises(ValueError, match=r"tp sizes that divide it: \[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64\]$"):
        even_range(1536 * 4, 5, 0, "FFN size")  # at most 64 listed


@pytest.mark.parametrize("vocab,world", [(49152, 1), (49152, 2), (49157, 2), (1000, 3), (4, 3), (1, 3)])
def test_vocab_range_contiguous_with_a_short_last(vocab, world):
    per = -(-vocab // world)
    ranges = [vocab_range(vocab, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(r * per == a or a == vocab for r, (a, _) in enumerate(ranges))  # rank r starts at r * ceil(V / tp)
    assert all(0 <= b - a <= per for a, b in ranges)
