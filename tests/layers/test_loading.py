"""The layers' shard specs (which named tensors, which rows or columns for a rank) and
Linear.load reading them: checked against slicing the full tensors by hand."""

from __future__ import annotations

import torch

from ringfuse.layers import (Linear, Shard, down_shards, gate_up_shards, head_split, o_proj_shards, qkv_shards,
                             read_bias, vocab_shards)  # fmt: skip

HIDDEN, D, HQ, HKV, FFN = 24, 4, 6, 2, 10


class Source:
    """HF-named tensors answering get(name, dim, start, stop) / has(name), as the runtime's
    readers do; records what was read."""

    def __init__(self, tensors):
        self.tensors, self.reads = tensors, []

    def has(self, name):
        return name in self.tensors

    def get(self, name, dim=None, start=0, stop=None):
        self.reads.append((name, dim, start, stop))
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start)


def _tensors(biases=True):
    g = torch.Generator().manual_seed(0)
    p = "model.layers.0."
    t = {p + "self_attn.q_proj.weight": torch.randn(HQ * D, HIDDEN, generator=g),
         p + "self_attn.k_proj.weight": torch.randn(HKV * D, HIDDEN, generator=g),
         p + "self_attn.v_proj.weight": torch.randn(HKV * D, HIDDEN, generator=g),
         p + "self_attn.o_proj.weight": torch.randn(HIDDEN, HQ * D, generator=g),
         p + "mlp.gate_proj.weight": torch.randn(FFN, HIDDEN, generator=g),
         p + "mlp.up_proj.weight": torch.randn(FFN, HIDDEN, generator=g),
         p + "mlp.down_proj.weight": torch.randn(HIDDEN, FFN, generator=g)}  # fmt: skip
    if biases:
        t.update({p + "self_attn.q_proj.bias": torch.randn(HQ * D, generator=g),
                  p + "self_attn.v_proj.bias": torch.randn(HKV * D, generator=g),  # no k bias: zeros
                  p + "mlp.down_proj.bias": torch.randn(HIDDEN, generator=g)})  # fmt: skip
    return t


def test_qkv_and_o_proj_take_this_ranks_heads():
    t = _tensors()
    src = Source(t)
    a = "model.layers.0.self_attn."
    for rank in range(2):
        (q0, q1), (k0, k1) = head_split(HQ, HKV, 2, rank)
        qkv = Linear.load(src, *qkv_shards(a, (q0, q1), (k0, k1), D, True), "none", torch.float32)
        want = torch.cat([t[a + "q_proj.weight"][q0 * D : q1 * D], t[a + "k_proj.weight"][k0 * D : k1 * D],
                          t[a + "v_proj.weight"][k0 * D : k1 * D]])  # fmt: skip
        assert torch.equal(qkv.weight, want)
        want_bias = torch.cat([t[a + "q_proj.bias"][q0 * D : q1 * D], torch.zeros((k1 - k0) * D),
                               t[a + "v_proj.bias"][k0 * D : k1 * D]])  # fmt: skip
        assert torch.equal(qkv.bias, want_bias)  # the missing k bias as zeros
        o = Linear.load(src, *o_proj_shards(a, (q0, q1), D, HIDDEN, rank == 0), "none", torch.float32)
        assert torch.equal(o.weight, t[a + "o_proj.weight"][:, q0 * D : q1 * D])
        assert o.bias is None  # no o_proj bias in the file, rank 0 or not
    # only this rank's rows were read, never a whole matrix
    assert all(dim is not None for _, dim, _, _ in src.reads)


def test_mlp_shards_and_the_bias_on_one_rank():
    t = _tensors()
    src = Source(t)
    m = "model.layers.0.mlp."
    ffn = (5, 10)
    gate_up = Linear.load(src, *gate_up_shards(m, ffn, True), "none", torch.float32)
    assert torch.equal(gate_up.weight, torch.cat([t[m + "gate_proj.weight"][5:], t[m + "up_proj.weight"][5:]]))
    assert gate_up.bias is None  # biased, but none in the file: no bias
    down0 = Linear.load(src, *down_shards(m, ffn, HIDDEN, True), "none", torch.float32)
    down1 = Linear.load(src, *down_shards(m, ffn, HIDDEN, False), "none", torch.float32)
    assert torch.equal(down0.weight, t[m + "down_proj.weight"][:, 5:]) and torch.equal(down0.weight, down1.weight)
    assert torch.equal(down0.bias, t[m + "down_proj.bias"]) and down1.bias is None


def test_quantized_load_in_blocks_equals_whole():
    """The LM head's blocks (vocab_shards) quantized one at a time give the whole matrix's
    int8 rows and scales (per-row quantization)."""
    table = torch.randn(10_000, 16, generator=torch.Generator().manual_seed(1))
    src = Source({"lm_head.weight": table})
    shards = vocab_shards("lm_head.weight", 1000, 9000)
    assert [(s.start, s.stop) for s in shards] == [(1000, 5096), (5096, 9000)]
    blocks = Linear.load(src, shards, None, "w8a16", torch.float32)
    whole = Linear(table[1000:9000], None, "w8a16", torch.float32)
    assert torch.equal(blocks.w_q, whole.w_q) and torch.equal(blocks.w_scale, whole.w_scale)


def test_read_bias_rules():
    src = Source({"a.bias": torch.ones(3)})
    assert read_bias(src, None) is None
    assert read_bias(src, [Shard("x.bias", 0, 0, 2)]) is None  # all missing: no bias
    assert torch.equal(read_bias(src, [Shard("a.bias", 0, 1, 3), Shard("x.bias", 0, 0, 2)]),
                       torch.tensor([1.0, 1.0, 0.0, 0.0]))  # fmt: skip
