"""ringfuse.ops.write_kv: new K/V rows into a contiguous or paged cache, vs index_put."""

import pytest
import torch

from ringfuse import _C
from ringfuse.ops import DeviceValueError, check_device_errors, decode_attention, paged_decode_attention, write_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def expected(cache, rows, slots, block_size):
    out = cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            out[s // block_size, :, s % block_size] = rows[t]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("block_size,hkv,d", [(16, 2, 64), (5, 3, 80), (1, 1, 7)], ids=str)
def test_paged_matches_index_put(dtype, slot_dtype, block_size, hkv, d):
    num_blocks, T = 12, 11
    k, v = make((T, hkv, d), dtype, 1), make((T, hkv, d), dtype, 2)
    k_cache, v_cache = make((num_blocks, hkv, block_size, d), dtype, 3), make((num_blocks, hkv, block_size, d), dtype, 4)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(5))[:T]
    slots[[2, 7]] = -1  # padding tokens
    slots = slots.to(slot_dtype)
    ref_k, ref_v = expected(k_cache, k, slots, block_size), expected(v_cache, v, slots, block_size)
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_contiguous_cache_prefill_then_decode():
    """The contiguous layout [B, Hkv, S_max, D] is block_size = S_max: slot = b * S_max + pos.
    Write a prefill then one decode token per sequence and attend over it."""
    B, hkv, S_max, d = 2, 2, 32, 64
    k_cache, v_cache = torch.zeros(B, hkv, S_max, d), torch.zeros(B, hkv, S_max, d)
    lens = [10, 4]
    k = make((sum(lens), hkv, d), torch.float32, 6)
    v = make((sum(lens), hkv, d), torch.float32, 7)
    slots = torch.tensor([b * S_max + p for b, n in enumerate(lens) for p in range(n)])
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[0, :, :10], k[:10].transpose(0, 1)) and torch.equal(v_cache[1, :, :4], v[10:].transpose(0, 1))
    assert bool((k_cache[0, :, 10:] == 0).all()) and bool((k_cache[1, :, 4:] == 0).all())
    # decode step: token at position len[b] for each sequence, strided views of a [T, 3, Hkv, D] qkv buffer
    qkv = make((B, 3, hkv, d), torch.float32, 8)
    write_kv(qkv[:, 1], qkv[:, 2], k_cache, v_cache, torch.tensor([0 * S_max + 10, 1 * S_max + 4]))
    assert torch.equal(k_cache[1, :, 4], qkv[1, 1]) and torch.equal(v_cache[0, :, 10], qkv[0, 2])
    seq_lens = torch.tensor([11, 5], dtype=torch.int32)
    out = decode_attention(qkv[:, 0], k_cache, v_cache, seq_lens)
    # the same data in pages gives the same bits
    pages_k = k_cache.reshape(B, hkv, 2, 16, d).permute(0, 2, 1, 3, 4).reshape(B * 2, hkv, 16, d)
    pages_v = v_cache.reshape(B, hkv, 2, 16, d).permute(0, 2, 1, 3, 4).reshape(B * 2, hkv, 16, d)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    assert torch.equal(paged_decode_attention(qkv[:, 0], pages_k, pages_v, table, seq_lens), out)


def test_duplicate_slot_keeps_the_last_token():
    k, v = make((3, 1, 8), torch.float32, 9), make((3, 1, 8), torch.float32, 10)
    kc, vc = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    write_kv(k, v, kc, vc, torch.tensor([2, 2, 2]))
    assert torch.equal(kc[0, 0, 2], k[2, 0]) and torch.equal(vc[0, 0, 2], v[2, 0])


def test_torch_compile_fullgraph():
    k, v = make((4, 2, 16), torch.float32, 11), make((4, 2, 16), torch.float32, 12)

    def step(k, v, kc, vc, slots):
        write_kv(k, v, kc, vc, slots)
        return kc.sum() + vc.sum()

    kc, vc = torch.zeros(3, 2, 4, 16), torch.zeros(3, 2, 4, 16)
    f = torch.compile(step, fullgraph=True, backend="aot_eager")
    total = f(k, v, kc, vc, torch.tensor([0, 5, 11, -1]))
    assert torch.equal(kc[1, :, 1], k[1]) and torch.equal(kc[2, :, 3], k[2])
    torch.testing.assert_close(total, k[:3].sum() + v[:3].sum())


def test_bad_inputs():
    k, v = make((3, 2, 16), torch.float32, 0), make((3, 2, 16), torch.float32, 1)
    kc, vc = torch.zeros(2, 2, 4, 16), torch.zeros(2, 2, 4, 16)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 8 outside \[-1, 8\)"):
        write_kv(k, v, kc, vc, torch.tensor([0, 8, 1]))
    assert bool((kc == 0).all())  # checked before any write
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] = -2"):
        write_kv(k, v, kc, vc, torch.tensor([0, 1, -2]))
    with pytest.raises(TypeError, match="slot_mapping must be an int64 or int32 tensor"):
        write_kv(k, v, kc, vc, slots.float())
    with pytest.raises(ValueError, match=r"slot_mapping must have shape \(3,\)"):
        write_kv(k, v, kc, vc, slots[:2])
    with pytest.raises(TypeError, match="k_cache must have k's dtype"):
        write_kv(k, v, kc.half(), vc, slots)
    with pytest.raises(ValueError, match="the cache must be"):
        write_kv(k, v, torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8), slots)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        write_kv(k, v[:2], kc, vc, slots[:2])
    with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape"):
        write_kv(k, v, kc, vc[:1], slots)
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        write_kv(k, v, kc[0], vc[0], slots)
    with pytest.raises(ValueError, match="k overlaps k_cache"):
        write_kv(kc[0, :, :3].transpose(0, 1), v, kc, vc, slots)
    with pytest.raises(ValueError, match="slot_mapping is on meta"):
        write_kv(k, v, kc, vc, slots.to("meta"))
    bad = torch.tensor([9], dtype=torch.int64)  # C++ re-checks slots
    with pytest.raises(ValueError, match="outside"):
        _C.write_kv(kc.data_ptr(), 128, 64, 16, vc.data_ptr(), 128, 64, 16, k.data_ptr(), 32, 16, v.data_ptr(), 32,
                    16, bad.data_ptr(), 1, 2, 16, 2, 4, 0)  # fmt: skip


@pytest.mark.gpu
def test_cuda_matches_cpu():
    k, v = make((9, 2, 64), torch.bfloat16, 20), make((9, 2, 64), torch.bfloat16, 21)
    kc, vc = make((4, 2, 16, 64), torch.bfloat16, 22), make((4, 2, 16, 64), torch.bfloat16, 23)
    slots = torch.tensor([3, -1, 63, 17, 16, 0, 40, 41, 5])
    kg, vg = kc.cuda(), vc.cuda()
    write_kv(k.cuda(), v.cuda(), kg, vg, slots.cuda())
    write_kv(k, v, kc, vc, slots)
    assert torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)
    check_device_errors()
    write_kv(k.cuda(), v.cuda(), kg, vg, (slots + 100).cuda())  # all past the cache: nothing written
    assert torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)
    with pytest.raises(DeviceValueError, match="slot_mapping value outside"):
        check_device_errors()


def test_cache_without_slots():
    """A cache of zero blocks holds nothing: a real slot is out of range (checked before the
    kernel, which would otherwise write past the empty buffer); all -1 is a no-op."""
    k = make((2, 1, 8), torch.float32, 30)
    kc, vc = torch.zeros(0, 1, 4, 8), torch.zeros(0, 1, 4, 8)
    with pytest.raises(ValueError, match=r"slot_mapping must lie in \[-1, 0\)"):
        write_kv(k, k, kc, vc, torch.tensor([0, -1]))
    write_kv(k, k, kc, vc, torch.tensor([-1, -1]))


# ---- PagedDecodePlan: rotary + write_kv + paged decode attention per layer ----------------


def _decode_step_inputs(batch, hq, hkv, d, block_size, dtype, seed, pos_dtype=torch.int64):
    """A paged cache with `batch` sequences already holding some tokens, and one new token each."""
    g = torch.Generator().manual_seed(seed)
    num_blocks, per_seq = 3 * batch + 2, 3
    k_pages = torch.randn(num_blocks, hkv, block_size, d, generator=g).to(dtype)
    v_pages = torch.randn(num_blocks, hkv, block_size, d, generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[: batch * per_seq].view(batch, per_seq).int()
    lens = torch.randint(1, per_seq * block_size + 1, (batch,), generator=g).int()  # the new token included
    pos = (lens - 1).to(pos_dtype)
    slots = (table.gather(1, (pos.long() // block_size)[:, None])[:, 0].long() * block_size + pos.long() % block_size)
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, generator=g).to(dtype)  # q, k, v as views of one row, as a model has
    cos_sin = rope_cache(64, d)
    return k_pages, v_pages, table, lens, pos, slots.to(pos_dtype), qkv, cos_sin


def rope_cache(max_pos, d):
    from ringfuse.ops import cos_sin_cache

    return cos_sin_cache(max_pos, d, base=10000.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,hq,hkv,d,block_size", [(1, 9, 3, 64, 16), (3, 4, 4, 32, 4), (5, 8, 2, 24, 8)])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=str)
def test_paged_decode_plan_equals_the_three_ops(dtype, batch, hq, hkv, d, block_size, pos_dtype):
    from ringfuse.ops import PagedDecodePlan, paged_decode_attention, rotary_embedding, write_kv

    k_pages, v_pages, table, lens, pos, slots, qkv, cos_sin = _decode_step_inputs(batch, hq, hkv, d, block_size,
                                                                                  dtype, batch + d, pos_dtype)  # fmt: skip
    views = lambda t: (t[:, : hq * d].view(batch, hq, d), t[:, hq * d : (hq + hkv) * d].view(batch, hkv, d),  # noqa: E731
                       t[:, (hq + hkv) * d :].view(batch, hkv, d))  # fmt: skip
    qkv_a, kp_a, vp_a = qkv.clone(), k_pages.clone(), v_pages.clone()
    q, k, v = views(qkv_a)
    rotary_embedding(q, k, pos, cos_sin)
    write_kv(k, v, kp_a, vp_a, slots)
    want = paged_decode_attention(q, kp_a, vp_a, table, lens)
    qkv_b, kp_b, vp_b = qkv.clone(), k_pages.clone(), v_pages.clone()
    plan = PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, hq)
    got = plan.run(*views(qkv_b), kp_b, vp_b)
    assert torch.equal(got, want) and torch.equal(qkv_b, qkv_a)  # q and k rotated in place alike
    assert torch.equal(kp_b, kp_a) and torch.equal(vp_b, vp_a)
    qkv_c, kp_c, vp_c = qkv.clone(), k_pages.clone(), v_pages.clone()  # the fused projection as it comes
    assert torch.equal(plan.run_packed(qkv_c, kp_c, vp_c), want) and torch.equal(qkv_c, qkv_a)
    assert torch.equal(kp_c, kp_a) and torch.equal(vp_c, vp_a)
    wide = torch.zeros(batch, qkv.shape[1] + 8, dtype=dtype)  # rows further apart than their width
    wide[:, : qkv.shape[1]] = qkv
    kp_d, vp_d = k_pages.clone(), v_pages.clone()
    assert torch.equal(plan.run_packed(wide[:, : qkv.shape[1]], kp_d, vp_d), want) and torch.equal(kp_d, kp_a)


@pytest.mark.parametrize("scale,softcap", [(0.3, None), (None, 1.5), (0.2, 0.75)])
def test_paged_decode_plan_scale_and_softcap(scale, softcap):
    """scale and softcap (Gemma 2's query_pre_attn_scalar and attention soft cap) as
    paged_decode_attention applies them, on the direct kernel path."""
    from ringfuse.ops import PagedDecodePlan, paged_decode_attention, rotary_embedding, write_kv

    batch, hq, hkv, d = 3, 4, 2, 16
    k_pages, v_pages, table, lens, pos, slots, qkv, cos_sin = _decode_step_inputs(batch, hq, hkv, d, 4, torch.float32, 5)
    qkv = qkv * 4  # scores of a few units, where the cap bites
    a = qkv.clone()
    q, k, v = a[:, : hq * d].view(batch, hq, d), a[:, hq * d : (hq + hkv) * d].view(batch, hkv, d), \
        a[:, (hq + hkv) * d :].view(batch, hkv, d)  # fmt: skip
    kp_a, vp_a = k_pages.clone(), v_pages.clone()
    rotary_embedding(q, k, pos, cos_sin)
    write_kv(k, v, kp_a, vp_a, slots)
    want = paged_decode_attention(q, kp_a, vp_a, table, lens, scale=scale, softcap=softcap)
    plan = PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, hq, scale=scale, softcap=softcap)
    got = plan.run_packed(qkv.clone(), k_pages.clone(), v_pages.clone())
    assert torch.equal(got, want)
    plain = paged_decode_attention(q, kp_a, vp_a, table, lens)
    assert (want - plain).abs().max() > 1e-3  # the arguments matter on these inputs
    with pytest.raises(ValueError, match="softcap"):
        PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, hq, softcap=-1.0)


@pytest.mark.parametrize("window", [1, 3, 100])
def test_paged_decode_plan_window_per_run(window):
    """A window given per run (per layer: Gemma 2 alternates) as paged_decode_attention
    applies it, on both entry points; no window on the next run attends to every key."""
    from ringfuse.ops import PagedDecodePlan, paged_decode_attention, rotary_embedding, write_kv

    batch, hq, hkv, d = 4, 4, 2, 16
    k_pages, v_pages, table, lens, pos, slots, qkv, cos_sin = _decode_step_inputs(batch, hq, hkv, d, 4, torch.float32, 6)
    a = qkv.clone()
    q, k, v = a[:, : hq * d].view(batch, hq, d), a[:, hq * d : (hq + hkv) * d].view(batch, hkv, d), \
        a[:, (hq + hkv) * d :].view(batch, hkv, d)  # fmt: skip
    kp_a, vp_a = k_pages.clone(), v_pages.clone()
    rotary_embedding(q, k, pos, cos_sin)
    write_kv(k, v, kp_a, vp_a, slots)
    want = paged_decode_attention(q, kp_a, vp_a, table, lens, window=window)
    plan = PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, hq)
    assert torch.equal(plan.run_packed(qkv.clone(), k_pages.clone(), v_pages.clone(), window=window), want)
    b = qkv.clone()
    views = b[:, : hq * d].view(batch, hq, d), b[:, hq * d : (hq + hkv) * d].view(batch, hkv, d), \
        b[:, (hq + hkv) * d :].view(batch, hkv, d)  # fmt: skip
    assert torch.equal(plan.run(*views, k_pages.clone(), v_pages.clone(), window=window), want)
    everything = plan.run_packed(qkv.clone(), k_pages.clone(), v_pages.clone())
    assert torch.equal(everything, paged_decode_attention(q, kp_a, vp_a, table, lens))
    if window < int(lens.min()):
        assert (everything - want).abs().max() > 1e-3  # the window matters on these inputs
    with pytest.raises(ValueError, match="window must be None or an int >= 1"):
        plan.run_packed(qkv.clone(), k_pages.clone(), v_pages.clone(), window=0)


def test_paged_decode_plan_bad_inputs():
    from ringfuse.ops import PagedDecodePlan

    k_pages, v_pages, table, lens, pos, slots, qkv, cos_sin = _decode_step_inputs(2, 4, 2, 16, 4, torch.float32, 0)
    q, k, v = qkv[:, :64].view(2, 4, 16), qkv[:, 64:96].view(2, 2, 16), qkv[:, 96:].view(2, 2, 16)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, 3)
    with pytest.raises(ValueError, match="one row per sequence, got block_table 2, seq_lens 2, positions 1, "
                                         "slot_mapping 2"):  # fmt: skip
        PagedDecodePlan(k_pages, v_pages, cos_sin, pos[:1], slots, table, lens, 4)
    with pytest.raises(ValueError, match="got block_table 1, seq_lens 2"):  # blamed seq_lens alone
        PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table[:1], lens, 4)
    with pytest.raises(TypeError, match="slot_mapping must be an int64 or int32 tensor"):
        PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots.float(), table, lens, 4)
    with pytest.raises(TypeError, match="seq_lens must have dtype int32"):
        PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens.long(), 4)
    with pytest.raises(ValueError, match="v_pages must match k_pages"):
        PagedDecodePlan(k_pages, v_pages[:-1], cos_sin, pos, slots, table, lens, 4)
    with pytest.raises(ValueError, match="rot_dim must be even and <= head_dim 16"):
        PagedDecodePlan(k_pages, v_pages, rope_cache(64, 32), pos, slots, table, lens, 4)
    with pytest.raises(ValueError, match="style must be one of"):
        PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, 4, style="xx")
    plan = PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, 4)
    with pytest.raises(ValueError, match=r"q must be a tensor of shape \(2, 4, 16\)"):
        plan.run(q[:1], k, v, k_pages, v_pages)
    with pytest.raises(TypeError, match="k must be torch.float32"):
        plan.run(q, k.double(), v, k_pages, v_pages)
    with pytest.raises(ValueError, match="k_pages must have the planned cache's shape"):
        plan.run(q, k, v, k_pages[:-1], v_pages)
    with pytest.raises(ValueError, match="v overlaps v_pages"):
        plan.run(q, k, v_pages[0, :, :2], k_pages, v_pages)
    with pytest.raises(ValueError, match="q and k share memory"):  # as rotary_embedding: rotated twice
        plan.run(q, q[:, :2], v, k_pages, v_pages)
    with pytest.raises(ValueError, match="k's \\(token, head\\) rows overlap"):
        plan.run(q, k[:, :1].expand(2, 2, 16), v, k_pages, v_pages)
    with pytest.raises(ValueError, match=r"qkv must be a tensor of shape \(2, 128\)"):
        plan.run_packed(qkv[:, :64], k_pages, v_pages)
    with pytest.raises(ValueError, match="qkv overlaps k_pages"):
        plan.run_packed(k_pages.view(-1)[:256].view(2, 128), k_pages, v_pages)
    with pytest.raises(TypeError, match="qkv must be torch.float32"):
        plan.run_packed(qkv.double(), k_pages, v_pages)
    bad = PagedDecodePlan(k_pages, v_pages, cos_sin, torch.tensor([0, 64]), slots, table, lens, 4)
    with pytest.raises(ValueError, match="position"):  # the rotary kernel checks the rows it reads
        bad.run(q, k, v, k_pages, v_pages)
    bad = PagedDecodePlan(k_pages, v_pages, cos_sin, pos, torch.tensor([0, 10**6]), table, lens, 4)
    with pytest.raises(ValueError, match="slot"):
        bad.run(q, k, v, k_pages, v_pages)


def test_refuses_caches_whose_slots_share_memory():
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    slots = torch.tensor([0, 5])
    cache = torch.zeros(1, 2, 4, 8).expand(3, 2, 4, 8)  # every block is the same memory
    with pytest.raises(ValueError, match="k_cache's rows overlap"):
        write_kv(k, v, cache, torch.zeros(3, 2, 4, 8), slots)
    with pytest.raises(ValueError, match="v_cache's rows overlap"):
        write_kv(k, v, torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 1, 8).expand(3, 2, 4, 8), slots)
    both = torch.zeros(3, 2, 4, 8)
    with pytest.raises(ValueError, match="k_cache and v_cache overlap"):
        write_kv(k, v, both, both, slots)


def test_decode_out_must_not_alias_the_cache():
    """out was checked against q only: an out inside v_cache overwrote the cache."""
    q = torch.randn(2, 4, 8)
    k_cache, v_cache = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        out = cache.view(-1)[:64].view(2, 4, 8)
        with pytest.raises(ValueError, match=f"out overlaps {name}"):
            decode_attention(q, k_cache, v_cache, lens, out=out)
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    pages = torch.randn(2, 2, 16, 8)
    with pytest.raises(ValueError, match="out overlaps v_pages"):
        paged_decode_attention(q, k_cache, pages, table, lens, out=pages.view(-1)[8:72].view(2, 4, 8))
