"""ringfuse.ops.decode_attention / paged_decode_attention on CPU vs an fp64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from ringfuse import _C
from ringfuse.ops import DeviceValueError, check_device_errors, decode_attention, paged_decode_attention

from .isa import at_avx2_and_avx512

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def reference64(q, k, v, lens, scale, softcap=None, window=None):
    """fp64 spec: per sequence b, softmax over its first lens[b] keys (the last `window` of
    them with a window); GQA by repeat."""
    B, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        if L == 0:
            continue
        lo = max(0, L - window) if window else 0
        kk = k[b, :, lo:L].double().repeat_interleave(group, 0)  # [Hq, L - lo, D]
        vv = v[b, :, lo:L].double().repeat_interleave(group, 0)
        s = torch.einsum("hd,hld->hl", q[b].double(), kk) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        out[b] = torch.einsum("hl,hld->hd", s.softmax(-1), vv)
    return out


def torch_same_dtype(q, k, v, lens, scale, softcap=None, window=None):
    """torch's own computation in the inputs' dtype (the error budget of the tolerance rule)."""
    B, Hq, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        L = int(lens[b])
        if L == 0:
            continue
        lo = max(0, L - window) if window else 0
        kb, vb = k[b : b + 1, :, lo:L], v[b : b + 1, :, lo:L]
        if softcap:
            group = Hq // k.shape[1]
            s = torch.einsum("hd,hld->hl", q[b], kb[0].repeat_interleave(group, 0)) * scale
            s = softcap * torch.tanh(s / softcap)
            out[b] = torch.einsum("hl,hld->hd", s.float().softmax(-1).to(q.dtype), vb[0].repeat_interleave(group, 0))
        else:
            out[b] = F.scaled_dot_product_attention(q[b : b + 1, :, None], kb, vb, scale=scale, enable_gqa=True)[0, :, 0]
    return out


def assert_tolerance(got, ref64, same_dtype):
    err = (got.double() - ref64).abs().max().item()
    err_torch = (same_dtype.double() - ref64).abs().max().item()
    floor = torch.finfo(got.dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= 2 * err_torch + floor, f"error {err:.3g} > 2 x torch's {err_torch:.3g} + {floor:.3g}"


def to_paged(k, block_size, seed):
    """The contiguous cache [B, H, S, D] as shuffled pages [B * S / bs, H, bs, D] + block table."""
    B, H, S, D = k.shape
    nb = S // block_size
    perm = torch.randperm(B * nb, generator=torch.Generator().manual_seed(seed))
    pages = torch.empty(B * nb, H, block_size, D, dtype=k.dtype)
    table = torch.empty(B, nb, dtype=torch.int32)
    for b in range(B):
        for i in range(nb):
            phys = int(perm[b * nb + i])
            pages[phys] = k[b, :, i * block_size : (i + 1) * block_size]
            table[b, i] = phys
    return pages, table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 2), (16, 2)], ids=str)
@pytest.mark.parametrize("d", [64, 80, 128, 7])
def test_decode_matches_reference(avx512_isa, dtype, hq, hkv, d):
    lens = torch.tensor([1, 77, 0, 300, 129], dtype=torch.int32)
    S = 320
    q, k, v = make((5, hq, d), dtype, 1), make((5, hkv, S, d), dtype, 2), make((5, hkv, S, d), dtype, 3)
    scale = 1 / math.sqrt(d)
    got = decode_attention(q, k, v, lens)
    assert got.dtype == dtype and got.shape == q.shape
    assert bool((got[2] == 0).all())  # empty sequence
    assert_tolerance(got, reference64(q, k, v, lens, scale), torch_same_dtype(q, k, v, lens, scale))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_context_and_softcap(avx512_isa, dtype):
    """Many splits (> 64 at the default split size), the full cache, softcap and a custom scale."""
    S = 64 * 256 + 96
    lens = torch.tensor([S, 1000], dtype=torch.int32)
    q, k, v = make((2, 6, 64), dtype, 4), make((2, 2, S, 64), dtype, 5), make((2, 2, S, 64), dtype, 6)
    got = decode_attention(q, k, v, lens, scale=0.3, softcap=5.0)
    assert_tolerance(got, reference64(q, k, v, lens, 0.3, 5.0), torch_same_dtype(q, k, v, lens, 0.3, 5.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [1, 5, 64, 300, 5000])
def test_sliding_window(avx512_isa, dtype, window):
    """The token sees its last `window` keys only (Mistral / Gemma 2): against the fp64
    reference over those keys; paged == contiguous bitwise; block ids before the window are
    neither read nor checked (a sliding-window cache may have recycled them)."""
    S = 1200
    lens = torch.tensor([1200, 77, 0, 300, 1, 640], dtype=torch.int32)
    q, k, v = make((6, 9, 64), dtype, 11), make((6, 3, S, 64), dtype, 12), make((6, 3, S, 64), dtype, 13)
    got = decode_attention(q, k, v, lens, scale=0.2, softcap=8.0, window=window)
    assert_tolerance(got, reference64(q, k, v, lens, 0.2, 8.0, window),
                     torch_same_dtype(q, k, v, lens, 0.2, 8.0, window))  # fmt: skip
    kp, table = to_paged(k, 16, seed=14)
    vp, _ = to_paged(v, 16, seed=14)
    for b, L in enumerate(lens.tolist()):
        table[b, : max(0, L - window) // 16] = -1  # whole blocks before the window
    paged = paged_decode_attention(q, kp, vp, table, lens, scale=0.2, softcap=8.0, window=window)
    assert torch.equal(paged, got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32, 5])
def test_paged_equals_contiguous_bitwise(avx512_isa, dtype, block_size):
    S = 160
    lens = torch.tensor([160, 33, 0, 17], dtype=torch.int32)
    q, k, v = make((4, 8, 64), dtype, 7), make((4, 2, S, 64), dtype, 8), make((4, 2, S, 64), dtype, 9)
    kp, table = to_paged(k, block_size, seed=10)
    vp, _ = to_paged(v, block_size, seed=10)
    got = paged_decode_attention(q, kp, vp, table, lens)
    assert torch.equal(got, decode_attention(q, k, v, lens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_splits_paged_threads(avx512_isa, dtype):
    """Long contexts of uneven lengths: several splits per sequence, each thread a run of
    items whose last tile prefetches the next item's first (across sequences and heads, and
    through a shuffled block table): within tolerance, paged == contiguous bitwise, and the
    same bits for 1, 2 and 3 threads. GQA group 3 (SmolLM2's 9/3/64) and 5 (odd blocking)."""
    for hq, hkv, d in [(9, 3, 64), (10, 2, 48)]:
        S = 1600
        lens = torch.tensor([1600, 513, 0, 1100, 64, 1], dtype=torch.int32)
        q, k, v = make((6, hq, d), dtype, 20), make((6, hkv, S, d), dtype, 21), make((6, hkv, S, d), dtype, 22)
        kp, table = to_paged(k, 16, seed=23)
        vp, _ = to_paged(v, 16, seed=23)
        prev = torch.get_num_threads()
        try:
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs += [decode_attention(q, k, v, lens), paged_decode_attention(q, kp, vp, table, lens)]
        finally:
            torch.set_num_threads(prev)
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        scale = 1 / math.sqrt(d)
        assert_tolerance(outs[0], reference64(q, k, v, lens, scale), torch_same_dtype(q, k, v, lens, scale))


@pytest.mark.skipif(not _C.build_info()["cpu_has_avx512_vnni"], reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avx512_decode_gives_the_avx2_bits(dtype):
    """The 16-lane decode kernel (two keys per register in the scores, 16 columns in P V) sums
    every lane in its AVX2 lane's order: the same bits for every GQA group size (1-8 and a
    9-head group split 8 + 1), head sizes that are not multiples of 16 or 8, softcap, a
    window, a paged cache, and -inf / NaN keys."""
    cases = [(4, 4, 64), (8, 4, 80), (9, 3, 128), (16, 4, 24), (10, 2, 96), (12, 2, 40), (14, 2, 16),
             (7, 1, 7), (16, 2, 256), (9, 1, 8), (3, 3, 1)]  # fmt: skip
    for n, (hq, hkv, d) in enumerate(cases):
        S = 200
        lens = torch.tensor([200, 1, 0, 77, 129], dtype=torch.int32)
        q, k, v = make((5, hq, d), dtype, 30 + n), make((5, hkv, S, d), dtype, 31 + n), make((5, hkv, S, d), dtype, 32 + n)
        k[3, 0, 5, 0], k[0, -1, 100, d - 1], v[4, 0, 7, 0] = -math.inf, math.nan, math.nan
        kp, table = to_paged(k, 8, seed=33)
        vp, _ = to_paged(v, 8, seed=33)
        for kwargs in (dict(), dict(softcap=5.0, scale=0.3), dict(window=33)):
            narrow, wide = at_avx2_and_avx512(
                lambda: (decode_attention(q, k, v, lens, **kwargs), paged_decode_attention(q, kp, vp, table, lens, **kwargs)))
            for a, b in zip(narrow, wide):
                assert torch.equal(a.nan_to_num(0.125), b.nan_to_num(0.125)) and torch.equal(a.isnan(), b.isnan()), (hq, hkv, d, kwargs)
            assert not wide[0][[1, 2]].isnan().any()  # the NaN / -inf keys stay in their sequences


def test_caches_without_keys_and_calls_without_query_heads(isa):
    """What has no keys gives zeros, as a length of 0 does; no query heads give an empty
    output. These raised 'bad cache geometry' / 'bad batch / head counts' from _C."""
    q = make((2, 4, 16), torch.float32, 14)
    empty, zeros = torch.empty(2, 2, 0, 16), torch.zeros(2, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    assert torch.equal(decode_attention(q, empty, empty, zeros, out=out), torch.zeros_like(q))
    pages = make((3, 2, 4, 16), torch.float32, 15)
    for table, k_pages in ((torch.zeros(2, 0, dtype=torch.int32), pages),  # no blocks per sequence
                           (torch.zeros(2, 3, dtype=torch.int32), pages[:0]),  # no blocks at all
                           (torch.zeros(2, 3, dtype=torch.int32), pages[:, :, :0])):  # blocks of 0 keys
        assert torch.equal(paged_decode_attention(q, k_pages, k_pages, table, zeros), torch.zeros_like(q))
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 1 outside \[0, 0\]"):
        decode_attention(q, empty, empty, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = 0 outside \[0, 0\)"):
        paged_decode_attention(q, pages[:0], pages[:0], torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.int32))
    k = make((2, 2, 8, 16), torch.float32, 16)
    assert decode_attention(q[:, :0], k, k, torch.ones(2, dtype=torch.int32)).shape == (2, 0, 16)


def test_strided_inputs_and_out():
    """q as a view of a fused qkv projection, caches as views of a [B, S, H, D] layout."""
    qkv = make((3, 12, 64), torch.float32, 11)
    q = qkv[:, :8]  # [B, Hq, D] with batch stride 12 * 64
    k = make((3, 40, 2, 64), torch.float32, 12).permute(0, 2, 1, 3)  # [B, Hkv, S, D], not contiguous
    v = make((3, 40, 2, 64), torch.float32, 13).permute(0, 2, 1, 3)
    lens = torch.tensor([40, 3, 17], dtype=torch.int32)
    out = torch.full((3, 8, 64), float("nan"))
    ret = decode_attention(q, k, v, lens, out=out)
    assert ret is out
    assert_tolerance(out, reference64(q, k, v, lens, 1 / 8), torch_same_dtype(q, k, v, lens, 1 / 8))


def test_deterministic_across_threads_and_runs():
    q, k, v = make((2, 8, 64), torch.float32, 14), make((2, 2, 3000, 64), torch.float32, 15), make(
        (2, 2, 3000, 64), torch.float32, 16
    )
    lens = torch.tensor([3000, 2049], dtype=torch.int32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention(q, k, v, lens)
        torch.set_num_threads(2)
        two, again = decode_attention(q, k, v, lens), decode_attention(q, k, v, lens)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two) and torch.equal(two, again)


def test_torch_compile_fullgraph():
    q, k, v = make((2, 4, 32), torch.float32, 17), make((2, 2, 50, 32), torch.float32, 18), make(
        (2, 2, 50, 32), torch.float32, 19
    )
    lens = torch.tensor([50, 9], dtype=torch.int32)
    f = torch.compile(lambda a, b, c, n: decode_attention(a, b, c, n) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, v, lens), decode_attention(q, k, v, lens) * 2)


def test_bad_inputs():
    q, k, v = make((2, 6, 16), torch.float32, 0), make((2, 4, 8, 16), torch.float32, 1), make((2, 4, 8, 16), torch.float32, 2)
    lens = torch.tensor([8, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of the number of kv heads \(4\)"):
        decode_attention(q, k, v, lens)
    k, v = k[:, :3], v[:, :3]
    with pytest.raises(ValueError, match="head_dim of q"):
        decode_attention(make((2, 6, 8), torch.float32, 0), k, v, lens)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 9 outside \[0, 8\]"):
        decode_attention(q, k, v, torch.tensor([8, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = -1"):
        decode_attention(q, k, v, torch.tensor([-1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="seq_lens must have dtype int32"):
        decode_attention(q, k, v, lens.long())
    with pytest.raises(ValueError, match=r"seq_lens must have shape \(2,\)"):
        decode_attention(q, k, v, lens[:1])
    with pytest.raises(TypeError, match="k must have q's dtype"):
        decode_attention(q, k.bfloat16(), v, lens)
    with pytest.raises(TypeError, match="q must have dtype"):
        decode_attention(q.double(), k, v, lens)
    with pytest.raises(ValueError, match="k and v caches must have the same shape"):
        decode_attention(q, k, v[:, :, :4], lens)
    with pytest.raises(ValueError, match="seq_lens is on meta"):
        decode_attention(q, k, v, lens.to("meta"))
    with pytest.raises(ValueError, match="unit stride in its last"):
        decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, lens)
    with pytest.raises(ValueError, match="scale must be"):
        decode_attention(q, k, v, lens, scale=0.0)
    with pytest.raises(ValueError, match="softcap must be"):
        decode_attention(q, k, v, lens, softcap=-1.0)
    for bad_window in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match=r"window must be None or an int >= 1"):
            decode_attention(q, k, v, lens, window=bad_window)
    with pytest.raises(ValueError, match=r"head_dim must be in \[1, 256\], got 300"):
        decode_attention(make((2, 3, 300), torch.float32, 0), make((2, 3, 4, 300), torch.float32, 0),
                         make((2, 3, 4, 300), torch.float32, 0), lens.clamp(max=4))
    # paged: block ids out of range are caught before any read
    kp, table = to_paged(k, 4, seed=1)
    vp, _ = to_paged(v, 4, seed=1)
    bad = table.clone()
    bad[1, 0] = kp.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 4 outside \[0, 4\)"):
        paged_decode_attention(q, kp, vp, bad, lens)
    bad[1, 0] = -3
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = -3"):
        paged_decode_attention(q, kp, vp, bad, lens)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 9 outside \[0, 8\]"):
        paged_decode_attention(q, kp, vp, table, torch.tensor([9, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="block_table must have dtype int32"):
        paged_decode_attention(q, kp, vp, table.long(), lens)
    with pytest.raises(ValueError, match="one row per sequence"):
        paged_decode_attention(q, kp, vp, table[:1], lens)
    # C++ re-checks what would read out of bounds
    too_long = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        _C.decode_attention(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 4, 2,
                            too_long.data_ptr(), 1, 1, 1, 4, 1.0, 0.0, 0, 0, 256, 1)
    with pytest.raises(ValueError, match="window must be >= 0"):
        _C.decode_attention(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 4, 2,
                            too_long.data_ptr(), 1, 1, 1, 4, 1.0, 0.0, -1, 0, 256, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_on_cuda_matches_cpu_and_checks_values(dtype):
    """CUDA tensors go to the Triton kernels; seq_lens / block ids are checked inside them
    (no sync): a bad one is reported by check_device_errors."""
    lens = torch.tensor([160, 33, 0, 17], dtype=torch.int32)
    q, k, v = make((4, 8, 64), dtype, 7), make((4, 2, 160, 64), dtype, 8), make((4, 2, 160, 64), dtype, 9)
    ref = reference64(q, k, v, lens, 1 / 8)
    got = decode_attention(q.cuda(), k.cuda(), v.cuda(), lens.cuda()).cpu()
    assert_tolerance(got, ref, torch_same_dtype(q, k, v, lens, 1 / 8))
    kp, table = to_paged(k, 16, seed=10)
    vp, _ = to_paged(v, 16, seed=10)
    paged = paged_decode_attention(q.cuda(), kp.cuda(), vp.cuda(), table.cuda(), lens.cuda()).cpu()
    assert torch.equal(paged, got)
    check_device_errors()
    zeros = decode_attention(q.cuda(), k.cuda(), v.cuda(), (lens + 200).cuda()).cpu()
    assert torch.equal(zeros, torch.zeros_like(zeros))  # every length past the cache: zero rows
    with pytest.raises(DeviceValueError, match="seq_lens outside"):
        check_device_errors()
    bad = table.clone()
    bad[0, 0] = 10_000
    paged_decode_attention(q.cuda(), kp.cuda(), vp.cuda(), bad.cuda(), lens.cuda())
    with pytest.raises(DeviceValueError, match="block_table entry outside"):
        check_device_errors()
    # a window: the same keys as the CPU reads, stale block ids before it allowed
    win = decode_attention(q.cuda(), k.cuda(), v.cuda(), lens.cuda(), window=20).cpu()
    assert_tolerance(win, reference64(q, k, v, lens, 1 / 8, window=20),
                     torch_same_dtype(q, k, v, lens, 1 / 8, window=20))  # fmt: skip
    stale = table.clone()
    stale[0, :8] = -1  # keys 0..127 of sequence 0 (length 160) lie before its window
    paged_win = paged_decode_attention(q.cuda(), kp.cuda(), vp.cuda(), stale.cuda(), lens.cuda(), window=20).cpu()
    assert torch.equal(paged_win, win)
    check_device_errors()  # entries before the window are never read, so never checked


# decode_attention skips its checks for the common CPU call (ops/attention.py _plain_decode);
# that shortcut must give the checked call's bits and leave every other call to the checks.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,hq,hkv,d,s", [(1, 9, 3, 64, 40), (3, 8, 8, 20, 17), (2, 4, 1, 256, 5), (2, 2, 2, 1, 9)])
def test_unchecked_decode_gives_the_checked_bits(dtype, b, hq, hkv, d, s):
    g = torch.Generator().manual_seed(b + hq + d)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k, v = torch.randn(b, hkv, s, d, generator=g).to(dtype), torch.randn(b, hkv, s, d, generator=g).to(dtype)
    lens = torch.randint(0, s + 1, (b,), generator=g, dtype=torch.int32)
    lens[0] = s
    checked = decode_attention(q, k, v, lens, scale=1.0 / math.sqrt(d))  # an explicit scale: the full checks
    assert torch.equal(decode_attention(q, k, v, lens), checked)
    out = torch.full_like(q, 7.0)
    assert decode_attention(q, k, v, lens, out=out) is out and torch.equal(out, checked)


def test_unchecked_decode_takes_only_plain_calls():
    from ringfuse.ops.attention import _plain_decode

    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    lens, out = torch.tensor([5, 3], dtype=torch.int32), torch.empty(2, 4, 8)
    assert _plain_decode(q, k, v, lens, None) and _plain_decode(q, k, v, lens, out)
    wide, v_big = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 8)
    rejected = {
        "q strided": (torch.randn(2, 4, 16)[:, :, :8], k, v, lens, None),
        "k strided": (q, wide[..., :8], v, lens, None),
        "q float64": (q.double(), k.double(), v.double(), lens, None),
        "k other dtype": (q, k.bfloat16(), v, lens, None),
        "v other shape": (q, k, torch.randn(2, 2, 4, 8), lens, None),
        "seq_lens int64": (q, k, v, lens.long(), None),
        "seq_lens 2-D": (q, k, v, lens[None], None),
        "seq_lens wrong length": (q, k, v, lens[:1], None),
        "batch mismatch": (q, k[:1], v[:1], lens, None),
        "head_dim mismatch": (torch.randn(2, 4, 7), k, v, lens, None),
        "Hq not a multiple of Hkv": (torch.randn(2, 3, 8), k, v, lens, None),
        "head_dim 257": (torch.randn(1, 1, 257), torch.randn(1, 1, 2, 257), torch.randn(1, 1, 2, 257),
                         lens[:1], None),  # fmt: skip
        "empty batch": (q[:0], k[:0], v[:0], lens[:0], None),
        "q requires grad": (q.clone().requires_grad_(), k, v, lens, None),
        "not a tensor": (q.tolist(), k, v, lens, None),
        "out other dtype": (q, k, v, lens, out.bfloat16()),
        "out other shape": (q, k, v, lens, torch.empty(2, 4, 9)),
        "out strided": (q, k, v, lens, torch.empty(2, 4, 16)[:, :, :8]),
        "out is q": (q, k, v, lens, q),
        "out inside v": (q, k, v_big, lens, v_big.view(-1)[:64].view(2, 4, 8)),
    }
    for why, args in rejected.items():
        assert not _plain_decode(*args), why
    with pytest.raises(ValueError, match="out overlaps v_cache"):
        decode_attention(*rejected["out inside v"][:4], out=rejected["out inside v"][4])
