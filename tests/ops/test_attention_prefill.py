"""ringfuse.ops.attention / attention_varlen (prefill) on CPU vs an fp64 reference, under
the tolerance rule, on the AVX2 path, the scalar fallback and (bf16, on CPUs with AMX) the
AMX tile path."""

import math

import pytest
import torch
import torch.nn.functional as F

from ringfuse import _C
from ringfuse.ops import attention, attention_varlen

from .isa import at_avx2_and_avx512

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def visible(sq, sk, window=None):
    """[Sq, Sk] bool: query i sees key j (causal, bottom-right aligned; within the window)."""
    keep = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    if window:
        keep &= ~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq - window)
    return keep


def reference64(q, k, v, causal, scale, softcap=None, window=None):
    """fp64 spec: [B, Hq, Sq, Sk] scores, GQA by repeat, causal bottom-right aligned (and a
    sliding window), rows without a visible key -> zeros and lse -inf. Returns (out, lse)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        s = s.masked_fill(~visible(q.shape[2], k.shape[2], window), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv, lse


def torch_same_dtype(q, k, v, causal, scale, softcap=None, window=None):
    """torch's own computation in the inputs' dtype: the error budget of the tolerance rule."""
    sq, sk = q.shape[2], k.shape[2]
    if softcap is None and window is None and (not causal or sq == sk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        s = s.masked_fill(~visible(sq, sk, window), -math.inf)
    p = torch.softmax(s.float(), -1).nan_to_num(0.0).to(q.dtype)
    return p @ v.repeat_interleave(group, 1)


def assert_tolerance(got, ref64, same_dtype):
    err = (got.double() - ref64).abs().max().item()
    err_torch = (same_dtype.double() - ref64).abs().max().item()
    floor = torch.finfo(got.dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= 2 * err_torch + floor, f"error {err:.3g} > 2 x torch's {err_torch:.3g} + {floor:.3g}"


def one_and_two_threads(fn):
    """fn() run with 1 thread, then with 2 (torch's thread count restored after)."""
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        return one, fn()
    finally:
        torch.set_num_threads(prev)


def assert_equals_per_sequence_calls(got, q, k, v, cu_q, cu_k, **kw):
    """varlen output ``got`` is, bitwise, one ``attention`` call per non-empty sequence."""
    for b in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = cu_q[b : b + 2].tolist(), cu_k[b : b + 2].tolist()
        if q1 > q0:
            one = attention(*(t[a:z].transpose(0, 1)[None] for t, a, z in ((q, q0, q1), (k, k0, k1), (v, k0, k1))), **kw)
            assert torch.equal(got[q0:q1], one[0].transpose(0, 1))


def check(q, k, v, causal, scale=None, softcap=None, window=None):
    d = q.shape[-1]
    scale_v = scale if scale is not None else 1 / math.sqrt(d)
    got, lse = attention(q, k, v, causal=causal, scale=scale, softcap=softcap, window=window, return_lse=True)
    assert got.dtype == q.dtype and got.shape == q.shape and lse.dtype == torch.float32
    ref, ref_lse = reference64(q, k, v, causal, scale_v, softcap, window)
    assert_tolerance(got, ref, torch_same_dtype(q, k, v, causal, scale_v, softcap, window))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=0, atol=1e-4 * max(1, d / 64))
    return got, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [1, 7, 77, 129, 1000])
def test_odd_lengths(prefill_isa, dtype, causal, s):
    q, k, v = make((1, 9, s, 64), dtype, 1), make((1, 3, s, 64), dtype, 2), make((1, 3, s, 64), dtype, 3)
    check(q, k, v, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 2), (16, 2), (3, 1)], ids=str)
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256, 20])
def test_gqa_and_head_dims(prefill_isa, dtype, hq, hkv, d):
    q, k, v = make((2, hq, 37, d), dtype, 4), make((2, hkv, 37, d), dtype, 5), make((2, hkv, 37, d), dtype, 6)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 77), (7, 129), (16, 1000), (77, 7), (100, 40), (65, 64)], ids=str)
def test_sq_differs_from_sk(prefill_isa, dtype, causal, sq, sk):
    """Chunked prefill: causal aligned bottom-right; with Sq > Sk the first queries see no
    key at all (zeros, lse = -inf, as flash-attn)."""
    q, k, v = make((2, 8, sq, 64), dtype, 7), make((2, 2, sk, 64), dtype, 8), make((2, 2, sk, 64), dtype, 9)
    got, lse = check(q, k, v, causal)
    if causal and sq > sk:
        assert bool((got[:, :, : sq - sk] == 0).all()) and bool((lse[:, :, : sq - sk] == -math.inf).all())


@pytest.mark.parametrize("causal", [False, True])
def test_long_context_fp32(avx512_isa, causal):
    # near-uniform softmax over 8192 keys: O is a long sum (summed key by key into O, the
    # vector paths had 1.5-1.7x this test's error budget, the fp32 scalar fallback more)
    q, k, v = make((1, 1, 256, 64), torch.float32, 1), make((1, 1, 8192, 64), torch.float32, 2), make(
        (1, 1, 8192, 64), torch.float32, 3)  # fmt: skip
    check(q, k, v, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_and_scale(prefill_isa, dtype):
    q, k, v = make((2, 6, 70, 64), dtype, 10, 3.0), make((2, 2, 90, 64), dtype, 11, 3.0), make((2, 2, 90, 64), dtype, 12)
    check(q, k, v, causal=True, scale=0.3, softcap=20.0)
    check(q, k, v, causal=False, softcap=5.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [1e3, 1e6, 1e8], ids=lambda c: f"cap{c:g}")
def test_large_softcap(prefill_isa, dtype, softcap):
    """softcap * tanh(s / softcap) ~ s: tanh's error near 0 is multiplied back by the cap (a
    tanh with ~1e-7 absolute error gave 0.08 at 1e6 and made the scores uniform at 1e8)."""
    q, k, v = (make((1, 2, 40, 64), dtype, seed) for seed in (31, 32, 33))
    check(q, k, v, causal=True, softcap=softcap)
    check(q, k, v, causal=False, scale=0.3, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,sk,window", [(77, 77, 1), (77, 77, 5), (200, 200, 64), (130, 130, 63), (40, 300, 100),
                                          (1, 500, 129), (129, 129, 1000), (70, 60, 16)], ids=str)  # fmt: skip
def test_sliding_window(prefill_isa, dtype, sq, sk, window):
    """Query i sees keys (i + Sk - Sq - window, i + Sk - Sq] only: tiles the window skips,
    tiles it cuts, windows wider than the context, more queries than keys."""
    q, k, v = make((2, 6, sq, 64), dtype, 17), make((2, 2, sk, 64), dtype, 18), make((2, 2, sk, 64), dtype, 19)
    check(q, k, v, causal=True, window=window)
    check(q, k, v, causal=True, scale=0.3, softcap=20.0, window=window)


def test_sliding_window_varlen_equals_per_sequence_calls(prefill_isa):
    lens_q, lens_k = [5, 0, 130, 1], [9, 3, 130, 40]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, 4, 2, 32, torch.float32, 24)
    got = attention_varlen(q, k, v, cu_q, cu_k, causal=True, window=17)
    assert_equals_per_sequence_calls(got, q, k, v, cu_q, cu_k, causal=True, window=17)


def test_matches_sdpa_drop_in():
    """Same call shape as F.scaled_dot_product_attention(..., is_causal, scale, enable_gqa)."""
    q, k, v = make((2, 8, 50, 64), torch.float32, 13), make((2, 4, 50, 64), torch.float32, 14), make(
        (2, 4, 50, 64), torch.float32, 15)  # fmt: skip
    for causal in (False, True):
        torch.testing.assert_close(attention(q, k, v, causal=causal, scale=0.2),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.2,
                                                                  enable_gqa=True), atol=2e-6, rtol=1e-5)  # fmt: skip


def test_strided_layouts_and_out():
    """q/k/v as [B, S, H, D] views transposed to [B, H, S, D] (HF's layout after the
    projection), a fused qkv buffer, and out= into a transposed view."""
    qkv = make((2, 33, 12, 64), torch.bfloat16, 16)  # [B, S, Hq + 2 Hkv, D]
    q, k, v = (t.transpose(1, 2) for t in (qkv[:, :, :8], qkv[:, :, 8:10], qkv[:, :, 10:]))
    ref, _ = reference64(q, k, v, True, 1 / 8)
    out = torch.full((2, 33, 8, 64), float("nan"), dtype=torch.bfloat16).transpose(1, 2)
    ret = attention(q, k, v, causal=True, out=out)
    assert ret is out
    assert_tolerance(out, ref, torch_same_dtype(q, k, v, True, 1 / 8))
    torch.testing.assert_close(attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True), out,
                               atol=0, rtol=0)  # fmt: skip


def test_empty_and_degenerate():
    q, k = make((2, 4, 0, 64), torch.float32, 0), make((2, 2, 5, 64), torch.float32, 1)
    assert attention(q, k, k, causal=True).shape == (2, 4, 0, 64)
    q = make((2, 4, 3, 64), torch.float32, 2)
    out, lse = attention(q, k[:, :, :0], k[:, :, :0], return_lse=True)  # no keys: zeros
    assert bool((out == 0).all()) and bool((lse == -math.inf).all())
    assert attention(q[:0], k[:0], k[:0]).shape == (0, 4, 3, 64)


def test_nan_propagates_only_where_seen():
    q, k, v = make((1, 2, 40, 64), torch.float32, 3), make((1, 2, 40, 64), torch.float32, 4), make(
        (1, 2, 40, 64), torch.float32, 5)  # fmt: skip
    k[0, 0, 20, 3] = float("nan")
    out = attention(q, k, v, causal=True)
    assert bool(torch.isfinite(out[0, 0, :20]).all())  # queries before key 20 never see it
    assert bool(torch.isnan(out[0, 0, 20:]).all()) and bool(torch.isfinite(out[0, 1]).all())


def test_deterministic_across_threads():
    q, k, v = make((1, 9, 300, 64), torch.float32, 6), make((1, 3, 300, 64), torch.float32, 7), make(
        (1, 3, 300, 64), torch.float32, 8)  # fmt: skip
    one, two = one_and_two_threads(lambda: attention(q, k, v, causal=True))
    assert torch.equal(one, two)


# ---------------------------------------------------------------------------------------
# varlen


def packed(lens_q, lens_k, hq, hkv, d, dtype, seed):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = make((int(cu_q[-1]), hq, d), dtype, seed)
    k, v = make((int(cu_k[-1]), hkv, d), dtype, seed + 1), make((int(cu_k[-1]), hkv, d), dtype, seed + 2)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_per_sequence_calls(prefill_isa, dtype, causal):
    """Mixed lengths (including an empty sequence and Sq != Sk) in one call give, bitwise,
    what one attention call per sequence gives, and match the reference."""
    lens_q, lens_k = [5, 0, 77, 1, 130], [9, 3, 77, 40, 130]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, 6, 2, 64, dtype, 20)
    out, lse = attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (6, q.shape[0])
    for b in range(len(lens_q)):
        (q0, q1), (k0, k1) = cu_q[b : b + 2].tolist(), cu_k[b : b + 2].tolist()
        if q1 == q0:
            continue
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        one, one_lse = attention(qs, ks, vs, causal=causal, return_lse=True)
        assert torch.equal(out[q0:q1], one[0].transpose(0, 1))
        assert torch.equal(lse[:, q0:q1], one_lse[0])
        ref, _ = reference64(qs, ks, vs, causal, 1 / 8)
        assert_tolerance(one, ref, torch_same_dtype(qs, ks, vs, causal, 1 / 8))


def test_varlen_rows_past_the_last_sequence_are_zero():
    q, k, v, cu_q, cu_k = packed([4, 6], [4, 6], 2, 2, 32, torch.float32, 30)
    q = torch.cat([q, make((3, 2, 32), torch.float32, 0)])  # 3 padding rows
    out = attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    assert bool((out[10:] == 0).all())


def test_varlen_bad_offsets():
    q, k, v, cu_q, cu_k = packed([4, 6], [4, 6], 2, 2, 32, torch.float32, 31)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease and end at most at 10"):
        attention_varlen(q, k, v, torch.tensor([0, 6, 4], dtype=torch.int32), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0"):
        attention_varlen(q, k, v, cu_q, torch.tensor([0, 4, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        attention_varlen(q, k, v, torch.tensor([1, 4, 10], dtype=torch.int32), cu_k)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype int32"):
        attention_varlen(q, k, v, cu_q.long(), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k must have cu_seqlens_q's shape"):
        attention_varlen(q, k, v, cu_q, cu_k[:2])
    with pytest.raises(ValueError, match="must have 3 dimensions"):
        attention_varlen(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="max_seqlen_q must be None or an int"):
        attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=-1)
    # C++ re-checks the offsets before reading
    bad = torch.tensor([0, 4, 99], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        _C.attention(1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, bad.data_ptr(), cu_k.data_ptr(),
                     2, 10, 10, 2, 2, 32, False, 1.0, 0.0, 0, 0, 1)  # fmt: skip


# ---------------------------------------------------------------------------------------
# autograd, torch.compile, bad input


@pytest.mark.parametrize("causal", [False, True])
def test_autograd_matches_sdpa(causal):
    q, k, v = (make(s, torch.float32, i).requires_grad_() for i, s in
               enumerate([(2, 6, 19, 32), (2, 2, 19, 32), (2, 2, 19, 32)]))  # fmt: skip
    g = make((2, 6, 19, 32), torch.float32, 9)
    grads = torch.autograd.grad(attention(q, k, v, causal=causal, softcap=None), (q, k, v), g)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), (q, k, v), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_autograd_varlen_and_bf16():
    q, k, v, cu_q, cu_k = packed([3, 7], [5, 7], 4, 2, 16, torch.bfloat16, 40)
    for t in (q, k, v):
        t.requires_grad_()
    out = attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    out.float().square().sum().backward()
    # per-sequence fp32 reference grads
    for b in range(2):
        (q0, q1), (k0, k1) = cu_q[b : b + 2].tolist(), cu_k[b : b + 2].tolist()
        qs, ks, vs = (t.detach()[a:z].float().transpose(0, 1)[None].requires_grad_() for t, a, z in
                      ((q, q0, q1), (k, k0, k1), (v, k0, k1)))  # fmt: skip
        o = reference64(qs, ks, vs, True, 0.25)[0]
        o.square().sum().backward()
        for got, ref in ((q.grad[q0:q1], qs.grad), (k.grad[k0:k1], ks.grad), (v.grad[k0:k1], vs.grad)):
            torch.testing.assert_close(got.float(), ref[0].transpose(0, 1).float(), atol=0.1, rtol=0.05)


def test_autograd_sliding_window():
    q, k, v = (make(s, torch.float32, i).requires_grad_() for i, s in
               enumerate([(1, 4, 23, 16), (1, 2, 23, 16), (1, 2, 23, 16)]))  # fmt: skip
    g = make((1, 4, 23, 16), torch.float32, 9)
    grads = torch.autograd.grad(attention(q, k, v, causal=True, window=6), (q, k, v), g)
    ref = torch.autograd.grad(reference64(q, k, v, True, 0.25, window=6)[0], (q, k, v), g.double())
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph():
    q, k, v = make((1, 4, 20, 32), torch.float32, 50), make((1, 2, 20, 32), torch.float32, 51), make(
        (1, 2, 20, 32), torch.float32, 52)  # fmt: skip
    f = torch.compile(lambda a, b, c: attention(a, b, c, causal=True) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, v), attention(q, k, v, causal=True) * 2)
    qv, kv, vv, cu_q, cu_k = packed([3, 7], [5, 7], 4, 2, 16, torch.float32, 53)
    fv = torch.compile(lambda a, b, c, x, y: attention_varlen(a, b, c, x, y, causal=True), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(fv(qv, kv, vv, cu_q, cu_k), attention_varlen(qv, kv, vv, cu_q, cu_k, causal=True))


def test_opcheck():
    q, k, v = make((1, 4, 9, 16), torch.float32, 60), make((1, 2, 9, 16), torch.float32, 61), make(
        (1, 2, 9, 16), torch.float32, 62)  # fmt: skip
    torch.library.opcheck(torch.ops.ringfuse.attention, (q, k, v, True, 0.25, 0.0))
    qv, kv, vv, cu_q, cu_k = packed([3, 7], [5, 7], 4, 2, 16, torch.float32, 63)
    torch.library.opcheck(torch.ops.ringfuse.attention_varlen, (qv, kv, vv, cu_q, cu_k, 7, True, 0.25, 0.0))
    torch.library.opcheck(torch.ops.ringfuse.attention, (q, k, v, True, 0.25, 0.0, 3))
    torch.library.opcheck(torch.ops.ringfuse.attention_varlen, (qv, kv, vv, cu_q, cu_k, 7, True, 0.25, 0.0, 3))


def test_bad_inputs():
    q, k, v = make((2, 6, 8, 16), torch.float32, 0), make((2, 4, 8, 16), torch.float32, 1), make(
        (2, 4, 8, 16), torch.float32, 2)  # fmt: skip
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of the number of kv heads \(4\)"):
        attention(q, k, v)
    k, v = k[:, :3], v[:, :3]
    with pytest.raises(ValueError, match=r"head_dim of q \(8\) and of k/v \(16\) differ"):
        attention(make((2, 6, 8, 8), torch.float32, 0), k, v)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        attention(q, k.bfloat16(), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="q must have dtype"):
        attention(q.int(), k, v)
    with pytest.raises(ValueError, match="k must be on a cpu or cuda device, got meta"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="q has batch 2 but k/v have 1"):
        attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim must be in"):
        big = make((1, 1, 2, 300), torch.float32, 0)
        attention(big, big, big)
    with pytest.raises(ValueError, match="unit stride in its last"):
        attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v)
    with pytest.raises(ValueError, match="scale must be"):
        attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="softcap must be"):
        attention(q, k, v, softcap=float("inf"))
    with pytest.raises(TypeError, match="causal must be a bool"):
        attention(q, k, v, causal=1)
    for bad_window in (0, -1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="window must be None or an int >= 1"):
            attention(q, k, v, causal=True, window=bad_window)
    with pytest.raises(ValueError, match="window needs causal=True"):
        attention(q, k, v, window=4)
    with pytest.raises(ValueError, match="window needs causal=True"):
        attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                         torch.tensor([0, 8], dtype=torch.int32), torch.tensor([0, 8], dtype=torch.int32), window=4)
    with pytest.raises(ValueError, match="out must match q"):
        attention(q, k, v, out=torch.empty(2, 6, 8, 8))
    with pytest.raises(ValueError, match="out overlaps q"):
        attention(q, k, v, out=q)
    with pytest.raises(ValueError, match="out= does not support autograd"):
        attention(q.clone().requires_grad_(), k, v, out=torch.empty_like(q))
    with pytest.raises(ValueError, match="num_q_heads must be a positive multiple"):  # C++ boundary
        _C.attention(1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 3, 2, 8, False, 1.0,
                     0.0, 0, 0, 1)  # fmt: skip
    with pytest.raises(ValueError, match="needs causal"):  # a window without causal, at the C++ boundary
        _C.attention(1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 8, False, 1.0,
                     0.0, 4, 0, 1)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype):
    """CUDA tensors go to the Triton flash kernel (4D and varlen)."""
    q, k, v = make((2, 8, 130, 64), dtype, 70), make((2, 2, 130, 64), dtype, 71), make((2, 2, 130, 64), dtype, 72)
    ref, _ = reference64(q, k, v, True, 1 / 8)
    got = attention(q.cuda(), k.cuda(), v.cuda(), causal=True).cpu()
    assert_tolerance(got, ref, torch_same_dtype(q, k, v, True, 1 / 8))
    ref_w, _ = reference64(q, k, v, True, 1 / 8, window=40)
    got_w = attention(q.cuda(), k.cuda(), v.cuda(), causal=True, window=40).cpu()
    assert_tolerance(got_w, ref_w, torch_same_dtype(q, k, v, True, 1 / 8, window=40))
    qv, kv, vv, cu_q, cu_k = packed([5, 0, 77], [9, 3, 77], 6, 2, 64, dtype, 73)
    cpu = attention_varlen(qv, kv, vv, cu_q, cu_k, causal=True)
    gpu = attention_varlen(qv.cuda(), kv.cuda(), vv.cuda(), cu_q.cuda(), cu_k.cuda(), causal=True).cpu()
    torch.testing.assert_close(gpu.float(), cpu.float(), atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=0)


# ---------------------------------------------------------------------------------------
# the AMX tile path (bf16, head_dim % 32 == 0): what the shared tests above do not reach

HAS_AMX = _C.build_info()["cpu_has_amx"]
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="no AMX-BF16 on this CPU (or OS, or build)")


@pytest.fixture
def amx():
    _C.set_isa("amx")
    assert _C.build_info()["attention_isa"] == "amx"
    yield
    _C.set_isa("auto")


@needs_amx
@pytest.mark.parametrize("hq,hkv,d,sq,sk,window", [(9, 3, 64, 300, 300, None), (4, 4, 128, 129, 400, None),
                                                   (16, 2, 256, 70, 70, None), (8, 2, 32, 17, 1000, None),
                                                   (6, 2, 64, 260, 260, 100), (4, 1, 128, 1, 513, 200)],
                         ids=str)  # fmt: skip
def test_amx_tiles_cross_every_boundary(amx, hq, hkv, d, sq, sk, window):
    """Query and key counts that leave partial 16-row, 16-key and 128-key tiles, windows
    that start inside a 16-key block, GQA groups of 1-8 and every head_dim the path takes."""
    q, k, v = (make((2, h, s, d), torch.bfloat16, seed, 2.0) for h, s, seed in ((hq, sq, 30), (hkv, sk, 31), (hkv, sk, 32)))
    check(q, k, v, causal=True, window=window)
    check(q, k, v, causal=False)


@needs_amx
def test_amx_softcap_scale_and_varlen(amx):
    q, k, v = make((1, 8, 150, 64), torch.bfloat16, 33, 3.0), make((1, 2, 150, 64), torch.bfloat16, 34, 3.0), make(
        (1, 2, 150, 64), torch.bfloat16, 35)  # fmt: skip
    check(q, k, v, causal=True, scale=0.3, softcap=20.0)
    check(q, k, v, causal=True, softcap=1e6)  # see test_large_softcap
    lens_q, lens_k = [5, 0, 130, 1, 40], [9, 3, 130, 200, 40]
    qp, kp, vp, cu_q, cu_k = packed(lens_q, lens_k, 8, 2, 64, torch.bfloat16, 36)
    got = attention_varlen(qp, kp, vp, cu_q, cu_k, causal=True)
    assert_equals_per_sequence_calls(got, qp, kp, vp, cu_q, cu_k, causal=True)


@needs_amx
def test_amx_deterministic_across_threads_and_infinite_rows(amx):
    q, k, v = make((1, 9, 200, 64), torch.bfloat16, 37), make((1, 3, 200, 64), torch.bfloat16, 38), make(
        (1, 3, 200, 64), torch.bfloat16, 39)  # fmt: skip
    k[0, 0, :50] = float("-inf")  # scores -inf or NaN for the first keys of kv head 0
    q[0, 1, :, :] = q[0, 1].abs()
    one, two = one_and_two_threads(lambda: attention(q, k, v, causal=True))
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))
    _C.set_isa("avx2")
    ref = attention(q, k, v, causal=True)
    assert torch.equal(torch.isnan(one), torch.isnan(ref))  # NaN exactly where the AVX2 path has it


@needs_amx
def test_amx_leaves_other_calls_to_avx2(amx):
    """float16 / float32 and head_dim 80 take the AVX2 kernel: the same bits."""
    for dtype, d, scale in [(torch.bfloat16, 80, None), (torch.float16, 64, 0.2), (torch.float32, 64, None)]:
        q, k, v = make((1, 4, 40, d), dtype, 40), make((1, 2, 40, d), dtype, 41), make((1, 2, 40, d), dtype, 42)
        _C.set_isa("amx")
        got = attention(q, k, v, causal=True, scale=scale)
        _C.set_isa("avx2")
        assert torch.equal(got, attention(q, k, v, causal=True, scale=scale)), (dtype, d, scale)


@pytest.mark.skipif(HAS_AMX, reason="this CPU has AMX")
def test_amx_refused_without_it():
    with pytest.raises(ValueError, match="isa 'amx' requested but this CPU"):
        _C.set_isa("amx")
    assert _C.build_info()["attention_isa"] != "amx"


@pytest.mark.skipif(not _C.build_info()["cpu_has_avx512_vnni"], reason="no AVX-512 on this CPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,d,sq,sk", [(9, 3, 64, 200, 200), (8, 1, 80, 77, 300), (6, 2, 256, 40, 40),
                                            (16, 2, 128, 65, 65), (4, 4, 20, 30, 30)], ids=str)  # fmt: skip
def test_avx512_products_give_the_avx2_bits(dtype, hq, hkv, d, sq, sk):
    """At the "avx512vnni" level the prefill products and the softmax's exponents run 16
    lanes wide (head_dim % 16 == 0) in the AVX2 kernel's order: every bit equals the AVX2
    path's, with causal and window masks cutting tiles anywhere and -inf / NaN scores."""
    q, k, v = make((2, hq, sq, d), dtype, 43), make((2, hkv, sk, d), dtype, 44), make((2, hkv, sk, d), dtype, 45)
    k[0, 0, 3, 0], k[1, -1, sk // 2, 1] = -math.inf, math.nan  # a -inf score column, a NaN one
    for kwargs in (dict(causal=True, softcap=10.0), dict(causal=False), dict(causal=True, window=37),
                   dict(causal=True, window=5)):
        narrow, wide = at_avx2_and_avx512(lambda: attention(q, k, v, return_lse=True, **kwargs))
        for a, b in zip(wide, narrow):
            assert torch.equal(a.nan_to_num(0.125), b.nan_to_num(0.125)) and torch.equal(a.isnan(), b.isnan()), kwargs
