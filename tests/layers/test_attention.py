"""ringfuse.layers.StepAttention against attention written out in fp64 torch math: a packed
prefill of two prompts (RoPE, the cache write into out-of-order pages, causal GQA
attention), then a decode step reading those pages back; with a scale, a soft cap and a
sliding window, as the architectures set them."""

from __future__ import annotations

import math

import pytest
import torch

from ringfuse.layers import KVCache, Step, StepAttention

HQ, HKV, D, BLOCK = 4, 2, 16, 4
BLOCKS = {0: [5, 2], 1: [7]}  # each sequence's pages, out of order


def _cos_sin(max_pos=64):
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()  # [max_pos, D]


def _rope(x, positions, cos_sin):  # [T, H, D] fp64, neox (rotate-half) style
    cos, sin = cos_sin.double()[positions].chunk(2, dim=-1)  # [T, D / 2] each
    cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _attend(q, k, v, q_pos, k_pos, scale, softcap, window):  # q [Tq, HQ, D], k / v [Tk, HKV, D], fp64
    k, v = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * (scale if scale is not None else D**-0.5)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    s = s.masked_fill(~mask, -math.inf)
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def _slot(seq, pos):
    return BLOCKS[seq][pos // BLOCK] * BLOCK + pos % BLOCK


@pytest.mark.parametrize("scale,softcap,window", [(None, None, None), (0.2, None, None), (None, 5.0, None),
                                                  (None, None, 3), (0.3, 4.0, 2)])  # fmt: skip
def test_prefill_then_decode_match_the_reference(scale, softcap, window):
    g = torch.Generator().manual_seed(0)
    lengths = (6, 3)
    cos_sin = _cos_sin()
    kv = KVCache(1, 8, HKV, BLOCK, D, torch.float32)
    opts = dict(scale=scale, softcap=softcap, windows=(window or 0,))
    # prefill: both prompts packed
    T = sum(lengths)
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    slots = torch.tensor([_slot(s, p) for s, n in enumerate(lengths) for p in range(n)])
    step = Step(input_ids=torch.zeros(T, dtype=torch.int64), positions=positions, slot_mapping=slots,
                cu_seqlens=torch.tensor([0, lengths[0], T], dtype=torch.int32), max_seqlen=max(lengths))  # fmt: skip
    heads = qkv.double().view(T, HQ + 2 * HKV, D).clone()
    q, k, v = _rope(heads[:, :HQ], positions, cos_sin), _rope(heads[:, HQ : HQ + HKV], positions, cos_sin), \
        heads[:, HQ + HKV :]  # fmt: skip
    out = StepAttention(step, kv, cos_sin, HQ, HKV, **opts)(qkv, 0)  # [T, HQ D]
    assert out.shape == (T, HQ * D)
    start = 0
    for s, n in enumerate(lengths):
        rows = slice(start, start + n)
        want = _attend(q[rows], k[rows], v[rows], positions[rows], positions[rows], scale, softcap, window)
        assert torch.allclose(out[rows].double().view(n, HQ, D), want, atol=2e-5), s
        for p in range(n):  # the rotated k and the v of every token in its page
            blk, off = divmod(_slot(s, p), BLOCK)
            assert torch.allclose(kv.k[0][blk, :, off].double(), k[start + p], atol=1e-5)
            assert torch.equal(kv.v[0][blk, :, off], qkv.view(T, HQ + 2 * HKV, D)[start + p, HQ + HKV :])
        start += n
    # decode: one new token per sequence, attending over its pages
    qkv_new = torch.randn(2, (HQ + 2 * HKV) * D, generator=g)
    new_pos = torch.tensor(lengths)
    decode = Step(input_ids=torch.zeros(2, dtype=torch.int64), positions=new_pos,
                  slot_mapping=torch.tensor([_slot(s, n) for s, n in enumerate(lengths)]),
                  block_table=torch.tensor([BLOCKS[0], BLOCKS[1] + [0]], dtype=torch.int32),
                  seq_lens=torch.tensor([n + 1 for n in lengths], dtype=torch.int32))  # fmt: skip
    new = qkv_new.double().view(2, HQ + 2 * HKV, D)
    q_new, k_new = _rope(new[:, :HQ], new_pos, cos_sin), _rope(new[:, HQ : HQ + HKV], new_pos, cos_sin)
    got = StepAttention(decode, kv, cos_sin, HQ, HKV, **opts)(qkv_new, 0).double().view(2, HQ, D)
    start = 0
    for s, n in enumerate(lengths):
        rows = slice(start, start + n)
        keys, values = torch.cat([k[rows], k_new[s : s + 1]]), torch.cat([v[rows], new[s : s + 1, HQ + HKV :]])
        want = _attend(q_new[s : s + 1], keys, values, new_pos[s : s + 1], torch.arange(n + 1), scale, softcap, window)
        assert torch.allclose(got[s], want[0], atol=2e-5), s
        start += n


def test_the_cache_layout_and_size():
    kv = KVCache(3, 5, HKV, BLOCK, D, torch.bfloat16)
    assert len(kv.k) == len(kv.v) == 3 and kv.k[0].shape == (5, HKV, BLOCK, D) and kv.v[2].dtype == torch.bfloat16
    assert KVCache.bytes_per_token(3, HKV, D, torch.bfloat16) == 2 * 3 * HKV * D * 2
