"""ringfuse.layers.VocabEmbedding / LMHead against plain torch indexing and matmul."""

import pytest
import torch

from ringfuse.layers import Linear, LMHead, VocabEmbedding


def table(rows=40, hidden=16, seed=0):
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))


def test_float_table_and_scale():
    t = table()
    ids = torch.tensor([0, 39, 7, 7])
    assert torch.equal(VocabEmbedding(0, 40, torch.float32, table=t)(ids), t[ids])
    scaled = VocabEmbedding(0, 40, torch.float32, table=t, scale=torch.tensor(4.0))(ids)
    assert torch.equal(scaled, t[ids] * 4)


def test_int8_head_rows_are_dequantized():
    t = table()
    head = Linear(t, None, "w8a16", torch.float32)
    ids = torch.tensor([3, 0, 39])
    got = VocabEmbedding(0, 40, torch.float32, head=head)(ids)
    want = head.w_q[ids].float() * head.w_scale[ids, None]
    assert torch.equal(got, want)
    assert (got - t[ids]).abs().max() <= head.w_scale.max() / 2 + 1e-7  # within half an int8 step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["table", "int8 head", "scaled"])
def test_out_gets_the_bits_of_a_new_tensor(kind, dtype):
    """out= (a decode graph's input buffer) holds exactly what the call returns without it:
    int8 rows dequantized in fp32 and rounded once to dtype either way."""
    t = table().to(dtype)
    head = Linear(table(), None, "w8a16", dtype) if kind == "int8 head" else None
    scale = torch.tensor(4.5, dtype=dtype) if kind == "scaled" else None
    emb = VocabEmbedding(0, 40, dtype, table=None if head else t, head=head, scale=scale)
    ids = torch.tensor([3, 0, 39, 3])
    want = emb(ids)
    out = torch.full((4, 16), float("nan"), dtype=dtype)
    assert emb(ids, out=out) is out and want.dtype == dtype and torch.equal(out, want)
    if head is not None:
        assert torch.equal(want, (head.w_q[ids].float() * head.w_scale[ids, None]).to(dtype))


def test_a_vocab_range_gives_zeros_outside_it_and_reduces():
    """Rank 1 of 2 over a vocab of 40: rows [20, 40); the ids of rank 0 give zero rows, and
    the reduction is called once on the [T, hidden] result."""
    t = table()
    calls = []
    emb = VocabEmbedding(20, 40, torch.float32, table=t[20:])
    got = emb(torch.tensor([5, 25, 39]), lambda h: calls.append(h.shape))
    assert calls == [(3, 16)]
    assert torch.equal(got[0], torch.zeros(16)) and torch.equal(got[1:], t[[25, 39]])


def test_bad_construction():
    with pytest.raises(ValueError, match="either table or head"):
        VocabEmbedding(0, 40, torch.float32)
    with pytest.raises(ValueError, match="either table or head"):
        VocabEmbedding(0, 40, torch.float32, table=table(), head=Linear(table(), None, "w8a16", torch.float32))
    with pytest.raises(ValueError, match=r"30 rows for the vocab range \[0, 40\)"):
        VocabEmbedding(0, 40, torch.float32, table=table(30))


def test_lm_head_logits_softcap_and_gather():
    w = table(10, 16, 1)
    h = torch.randn(3, 16)
    head = LMHead(Linear(w, None, "none", torch.float32), 10)
    torch.testing.assert_close(head(h), h @ w.T)
    capped = LMHead(Linear(w, None, "none", torch.float32), 10, softcap=2.0)(h)
    torch.testing.assert_close(capped, 2.0 * torch.tanh(h @ w.T / 2.0))
    # tp = 3 over a vocab of 10: 4 + 4 + 2 rows, the last range padded to 4 before the gather
    ranks = [w[0:4], w[4:8], w[8:10]]
    locals_ = [LMHead(Linear(r, None, "none", torch.float32), 10, world=3) for r in ranks]
    shares = {r: (h @ ranks[r].T).reshape(-1) for r in (0, 1)}  # what the other ranks send (4 columns each)

    def all_gather(t):  # this rank's flat share after theirs, as ring.all_gather returns them
        shares[2] = t.reshape(-1)
        return torch.cat([shares[r] for r in range(3)])

    full = locals_[2](h, all_gather)
    assert shares[2].numel() == 3 * 4 and torch.isinf(shares[2].view(3, 4)[:, 2:]).all()  # padded with -inf
    torch.testing.assert_close(full, h @ w.T)


def test_lm_head_gathers_an_empty_batch():
    """No rows (an empty step under TP): [0, vocab] logits, not a view error."""
    w = table(10, 16, 2)
    head = LMHead(Linear(w[:5], None, "none", torch.float32), 10, world=2)
    out = head(torch.zeros(0, 16), lambda t: torch.cat([t, t]))
    assert out.shape == (0, 10) and out.dtype == torch.float32
