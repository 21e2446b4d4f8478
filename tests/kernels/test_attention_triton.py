"""kernels/attention.py under the Triton interpreter (TRITON_INTERPRET=1, set in conftest),
on CPU tensors, vs an independent fp64 reference written here.

Tolerance (ARCHITECTURE.md): kernel error vs the fp64 reference <= 2x the error of torch's own
same-dtype computation vs that reference (F.scaled_dot_product_attention in the inputs'
dtype with enable_gqa=True, or, with softcap, which SDPA cannot express, the reference
formula evaluated in the inputs' dtype), plus a floor of a few fp32 ulps at the output's
magnitude (the fp32 math both share; negligible for fp16 / bf16 outputs). The reference is
computed from the same (already rounded) inputs, so it measures only the kernel's math.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ringfuse.kernels import attention as triton_attention
from ringfuse.kernels import device_errors

from .triton_helpers import interp_only

flash_attention_fwd = triton_attention.flash_attention_fwd
decode_attention_fwd = triton_attention.decode_attention_fwd
paged_decode_attention_fwd = triton_attention.paged_decode_attention_fwd


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dt_id(d):
    return str(d)[6:]


# rounds the interpreter's fp32 -> bf16 casts as GPUs do (tests/kernels/conftest.py)
pytestmark = pytest.mark.usefixtures("interpreter_bf16_round_to_nearest_even")


# ---------------------------------------------------------------------------------------
# Reference and baseline


def causal_mask(sq, sk, device="cpu", window=None):
    """[Sq, Sk] bool, bottom-right aligned: query i sees key j iff j <= i + Sk - Sq (and,
    with a window, j > i + Sk - Sq - window)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    keep = j <= i + (sk - sq)
    return keep & (j > i + (sk - sq) - window) if window else keep


def reference(q, k, v, scale, causal, softcap, compute_dtype=torch.float64, window=None):
    """Explicit softmax attention in compute_dtype: (out [B, Hq, Sq, D], lse [B, Hq, Sq]).
    GQA by repeat_interleave (reference only). Rows with no visible key: zeros, lse -inf."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device, window), float("-inf"))
    lse = torch.logsumexp(s.double(), dim=-1)
    empty = torch.isinf(lse)
    p = torch.softmax(s, dim=-1).masked_fill(empty[..., None], 0.0)
    return p @ v, lse


def torch_baseline(q, k, v, scale, causal, softcap, window=None):
    """torch in the inputs' dtype: SDPA (enable_gqa) or, with softcap, the formula."""
    if softcap is None:
        mask = causal_mask(q.shape[2], k.shape[2], q.device, window) if causal else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return reference(q, k, v, scale, causal, softcap, compute_dtype=q.dtype, window=window)[0]


def assert_close_2x(out, ref, base, rows=None, what="out"):
    """max |out - ref| <= 2 max |base - ref| + a few fp32 ulps at the output's magnitude;
    rows: optional bool mask of the query rows to compare (torch gives NaN on empty rows)."""
    if rows is not None:
        out, ref, base = out[rows], ref[rows], base[rows]
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    err_torch = (base.double() - ref).abs().max().item() if out.numel() else 0.0
    floor = 4 * torch.finfo(torch.float32).eps * max(ref.abs().max().item() if ref.numel() else 0.0, 1e-3)
    assert err <= 2 * err_torch + floor, f"{what}: kernel error {err:.3e} > 2 x torch error {err_torch:.3e} (+{floor:.1e})"


def assert_lse(lse, ref_lse):
    """lse is fp32 math on exact inputs in both: a few fp32 ulps of its magnitude."""
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite) and (lse[~finite] < 0).all()
    err = (lse[finite].double() - ref_lse[finite]).abs()
    assert (err <= 1e-5 * (1.0 + ref_lse[finite].abs())).all(), err.max().item()


def make(shape, dtype, g, mult=1.0):
    return (torch.randn(shape, generator=g) * mult).to(dtype)


# ---------------------------------------------------------------------------------------
# Prefill (flash_attention_fwd)

SHAPES = [(1, 1), (7, 7), (77, 77), (129, 129), (7, 77), (77, 129)]  # (Sq, Sk): Sq < Sk is chunked prefill
HEADS = [(2, 1), (3, 3), (4, 1), (6, 2)]  # (Hq, Hkv): GQA ratios 2, 1, 4, 3
HEAD_DIMS = [64, 80, 128, 40]


def flash_cases():
    cases, n = [], 0
    for dtype in DTYPES:
        for sq, sk in SHAPES:
            for causal in (False, True):
                hq, hkv = HEADS[n % len(HEADS)]
                d = HEAD_DIMS[(n // 2) % len(HEAD_DIMS)]
                softcap = 2.0 if n % 3 == 2 else None
                with_lse = n % 2 == 0
                cases.append((dtype, sq, sk, causal, hq, hkv, d, softcap, with_lse))
                n += 1
    return cases


def flash_id(c):
    dtype, sq, sk, causal, hq, hkv, d, softcap, with_lse = c
    return f"{dt_id(dtype)}-q{sq}k{sk}-{'causal' if causal else 'full'}-h{hq}kv{hkv}-d{d}-sc{softcap}-lse{int(with_lse)}"


def run_flash(q, k, v, scale, causal, softcap, with_lse, out=None):
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(q.shape[:3], dtype=torch.float32) if with_lse else None
    flash_attention_fwd(out, q, k, v, scale, causal, softcap=softcap, lse=lse)
    return out, lse


@interp_only
@pytest.mark.parametrize("case", flash_cases(), ids=flash_id)
def test_flash_matches_reference(case):
    dtype, sq, sk, causal, hq, hkv, d, softcap, with_lse = case
    g = torch.Generator().manual_seed(sq * 1000 + sk * 10 + d)
    b = 2 if sq * sk < 1000 else 1
    mult = 3.0 if softcap else 1.0  # scores well past the cap
    q = make((b, hq, sq, d), dtype, g, mult)
    k = make((b, hkv, sk, d), dtype, g)
    v = make((b, hkv, sk, d), dtype, g)
    scale = d**-0.5
    out, lse = run_flash(q, k, v, scale, causal, softcap, with_lse)
    ref, ref_lse = reference(q, k, v, scale, causal, softcap)
    assert_close_2x(out, ref, torch_baseline(q, k, v, scale, causal, softcap))
    if with_lse:
        assert_lse(lse, ref_lse)


@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_flash_causal_more_queries_than_keys(dtype, softcap):
    """Sq > Sk, bottom-right causal: the first Sq - Sk queries see no key -> zeros, lse -inf."""
    sq, sk, d = 77, 20, 64
    g = torch.Generator().manual_seed(5)
    q, k, v = make((1, 4, sq, d), dtype, g), make((1, 2, sk, d), dtype, g), make((1, 2, sk, d), dtype, g)
    out, lse = run_flash(q, k, v, 0.125, True, softcap, True)
    ref, ref_lse = reference(q, k, v, 0.125, True, softcap)
    empty = sq - sk
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert torch.isinf(lse[:, :, :empty]).all() and (lse[:, :, :empty] < 0).all()
    rows = torch.arange(sq) >= empty
    base = torch_baseline(q, k, v, 0.125, True, softcap)
    assert_close_2x(out[:, :, rows], ref[:, :, rows], base[:, :, rows])
    assert_lse(lse, ref_lse)


@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("sq,sk,window", [(77, 77, 1), (129, 129, 40), (7, 129, 20), (77, 129, 200)], ids=str)
def test_flash_sliding_window(dtype, sq, sk, window):
    """Query i sees keys (i + Sk - Sq - window, i + Sk - Sq]: tiles before the window are
    skipped, tiles it cuts are masked (HF's sliding_window, Mistral / Gemma 2)."""
    g = torch.Generator().manual_seed(sq + window)
    q, k, v = make((1, 4, sq, 64), dtype, g), make((1, 2, sk, 64), dtype, g), make((1, 2, sk, 64), dtype, g)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    flash_attention_fwd(out, q, k, v, 0.125, True, lse=lse, window=window)
    ref, ref_lse = reference(q, k, v, 0.125, True, None, window=window)
    assert_close_2x(out, ref, torch_baseline(q, k, v, 0.125, True, None, window))
    assert_lse(lse, ref_lse)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dt_id)
def test_flash_non_contiguous(dtype):
    """q / k / v / out as [B, S, H, D] buffers transposed to [B, H, S, D]; lse strided too;
    nothing outside out's window is written."""
    b, sq, sk, hq, hkv, d = 2, 37, 77, 6, 2, 96
    g = torch.Generator().manual_seed(9)
    q = make((b, sq, hq, d), dtype, g).transpose(1, 2)
    kv = make((b, sk, 2, hkv, d + 8), dtype, g)  # packed kv with padding in D
    k, v = kv[:, :, 0, :, :d].transpose(1, 2), kv[:, :, 1, :, :d].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous() and q.stride(-1) == 1
    sentinel = -7.0
    out_big = torch.full((b, sq, hq, d + 3), sentinel, dtype=dtype)
    out = out_big[..., :d].transpose(1, 2)
    lse_big = torch.full((b, sq, hq, 2), sentinel)
    lse = lse_big[..., 0].transpose(1, 2)
    flash_attention_fwd(out, q, k, v, d**-0.5, True, lse=lse)
    ref, ref_lse = reference(q, k, v, d**-0.5, True, None)
    assert_close_2x(out, ref, torch_baseline(q, k, v, d**-0.5, True, None))
    assert_lse(lse, ref_lse)
    assert (out_big[..., d:] == sentinel).all() and (lse_big[..., 1] == sentinel).all()
    # same result as on contiguous copies
    out_c, lse_c = run_flash(q.contiguous(), k.contiguous(), v.contiguous(), d**-0.5, True, None, True)
    assert torch.equal(out_c, out) and torch.equal(lse_c, lse)


@interp_only
def test_flash_no_keys():
    """Sk = 0: every row has no key -> zeros, lse -inf (causal or not)."""
    q = torch.randn(1, 2, 5, 64)
    k = torch.empty(1, 1, 0, 64)
    for causal in (False, True):
        out, lse = run_flash(q, k, k, 0.125, causal, None, True, out=torch.full_like(q, float("nan")))
        assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


@interp_only
def test_flash_d256_and_tiny_d():
    g = torch.Generator().manual_seed(3)
    for d in (256, 8):
        q, k, v = make((1, 2, 33, d), torch.float16, g), make((1, 1, 45, d), torch.float16, g), make(
            (1, 1, 45, d), torch.float16, g
        )
        out, lse = run_flash(q, k, v, d**-0.5, True, None, True)
        ref, ref_lse = reference(q, k, v, d**-0.5, True, None)
        assert_close_2x(out, ref, torch_baseline(q, k, v, d**-0.5, True, None))
        assert_lse(lse, ref_lse)


# ---------------------------------------------------------------------------------------
# Decode (contiguous and paged KV cache)


@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_flash_varlen_matches_per_sequence_reference(dtype, causal, softcap):
    """Packed sequences of mixed lengths (an empty one, Sq != Sk, one longer than a tile),
    rows past the last sequence left untouched."""
    lens_q, lens_k, hq, hkv, d = [5, 0, 70, 1], [9, 3, 70, 20], 4, 2, 40
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(31)
    q = make((int(cu_q[-1]) + 2, hq, d), dtype, g, 3.0 if softcap else 1.0)
    k, v = make((int(cu_k[-1]), hkv, d), dtype, g), make((int(cu_k[-1]), hkv, d), dtype, g)
    sentinel = -7.0
    out = torch.full_like(q, sentinel)
    lse = torch.full((hq, q.shape[0]), sentinel)
    triton_attention.flash_attention_varlen_fwd(out, q, k, v, cu_q, cu_k, max(lens_q), d**-0.5, causal,
                                                softcap=softcap, lse=lse)  # fmt: skip
    assert (out[int(cu_q[-1]) :] == sentinel).all() and (lse[:, int(cu_q[-1]) :] == sentinel).all()
    for b in range(len(lens_q)):
        (q0, q1), (k0, k1) = cu_q[b : b + 2].tolist(), cu_k[b : b + 2].tolist()
        if q1 == q0:
            continue
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        ref, ref_lse = reference(qs, ks, vs, d**-0.5, causal, softcap)
        got = out[q0:q1].transpose(0, 1)[None]
        assert_close_2x(got, ref, torch_baseline(qs, ks, vs, d**-0.5, causal, softcap))
        assert_lse(lse[:, q0:q1][None], ref_lse)


@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("block_size,d,hkv", [(16, 64, 2), (5, 40, 5), (12, 128, 1)], ids=str)
def test_write_kv_matches_index_put(dtype, block_size, d, hkv):
    """Rows land exactly where slot_mapping says (paged layout and, block_size = S_max,
    contiguous); -1 skips; nothing else changes."""
    g = torch.Generator().manual_seed(block_size)
    num_blocks, T = 4, 9
    k, v = make((T, hkv, d), dtype, g), make((T, hkv, d), dtype, g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[3] = -1
    k_cache, v_cache = make((num_blocks, hkv, block_size, d), dtype, g), make((num_blocks, hkv, block_size, d), dtype, g)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            ref_k[s // block_size, :, s % block_size] = k[t]
            ref_v[s // block_size, :, s % block_size] = v[t]
    triton_attention.write_kv_fwd(k_cache, v_cache, k, v, slots, block_size)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def decode_reference(q, k_cache, v_cache, seq_lens, scale, softcap, compute_dtype=torch.float64, sdpa=False):
    """[B, Hq, D] per sequence over its first len keys; len 0 -> zeros."""
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            outs.append(torch.zeros(q.shape[1:], dtype=compute_dtype, device=q.device))
            continue
        qb, kb, vb = q[b : b + 1, :, None], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n]
        if sdpa:
            o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)
        else:
            o = reference(qb, kb, vb, scale, False, softcap, compute_dtype)[0]
        outs.append(o[0, :, 0])
    return torch.stack(outs)


def decode_inputs(b, hq, hkv, s_max, d, dtype, seed, mult=1.0):
    g = torch.Generator().manual_seed(seed)
    q = make((b, hq, d), dtype, g, mult)
    k = make((b, hkv, s_max, d), dtype, g)
    v = make((b, hkv, s_max, d), dtype, g)
    return q, k, v


DECODE_CASES = [
    # dtype, Hq, Hkv, S_max, D, softcap, num_splits
    (torch.float32, 4, 4, 77, 64, None, None),
    (torch.float32, 6, 2, 129, 80, 2.0, 3),
    (torch.float16, 4, 1, 129, 128, None, 7),
    (torch.float16, 3, 1, 77, 40, 2.0, 1),
    (torch.bfloat16, 8, 2, 129, 64, None, 4),
    (torch.bfloat16, 6, 2, 77, 128, 2.0, None),
    (torch.bfloat16, 2, 2, 7, 80, None, 16),  # more splits than tiles: empty splits
    (torch.float16, 34, 2, 129, 64, 2.0, None),  # group 17: two programs per kv head, one head in the 2nd
    (torch.float32, 40, 1, 77, 40, None, 2),  # MQA, group 40: three programs, the last half empty
]


@interp_only
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{dt_id(c[0])}-h{c[1]}kv{c[2]}-s{c[3]}-d{c[4]}-sc{c[5]}-sp{c[6]}")
def test_decode_matches_reference(case):
    dtype, hq, hkv, s_max, d, softcap, num_splits = case
    seq_lens = torch.tensor([0, s_max, 1, min(37, s_max)], dtype=torch.int32)
    q, k, v = decode_inputs(4, hq, hkv, s_max, d, dtype, seed=s_max + d, mult=3.0 if softcap else 1.0)
    out = torch.full_like(q, float("nan"))
    decode_attention_fwd(out, q, k, v, seq_lens, d**-0.5, softcap=softcap, num_splits=num_splits)
    assert torch.equal(out[0], torch.zeros_like(out[0])), "len 0 -> zeros"
    ref = decode_reference(q, k, v, seq_lens, d**-0.5, softcap)
    base = decode_reference(q, k, v, seq_lens, d**-0.5, softcap, compute_dtype=dtype, sdpa=softcap is None)
    assert_close_2x(out, ref, base.to(dtype))
    # deterministic, and the split count changes only rounding
    out2 = torch.empty_like(q)
    decode_attention_fwd(out2, q, k, v, seq_lens, d**-0.5, softcap=softcap, num_splits=num_splits)
    assert torch.equal(out, out2)


@interp_only
def test_decode_non_contiguous():
    """q / out as slices of packed [B, H, 3, D] buffers; the cache as [B, S, H, D]^T."""
    b, hq, hkv, s_max, d = 3, 4, 2, 50, 64
    g = torch.Generator().manual_seed(21)
    qkv = make((b, hq, 3, d), torch.bfloat16, g)
    q = qkv[:, :, 1]
    k = make((b, s_max, hkv, d), torch.bfloat16, g).transpose(1, 2)
    v = make((b, s_max, hkv, d), torch.bfloat16, g).transpose(1, 2)
    seq_lens = torch.tensor([50, 13, 29], dtype=torch.int32)
    out_big = torch.full((b, hq, 2, d), -7.0, dtype=torch.bfloat16)
    out = out_big[:, :, 0]
    decode_attention_fwd(out, q, k, v, seq_lens, 0.125, num_splits=2)
    ref = decode_reference(q, k, v, seq_lens, 0.125, None)
    assert_close_2x(out, ref, decode_reference(q, k, v, seq_lens, 0.125, None, torch.bfloat16, True))
    assert (out_big[:, :, 1] == -7.0).all()
    out_c = torch.empty(b, hq, d, dtype=torch.bfloat16)
    decode_attention_fwd(out_c, q.contiguous(), k.contiguous(), v.contiguous(), seq_lens, 0.125, num_splits=2)
    assert torch.equal(out_c, out)


def to_pages(k_cache, v_cache, block_size, seed):
    """Scatter a contiguous [B, Hkv, S_max, D] cache into shuffled physical pages (plus two
    spare pages filled with garbage); returns (k_pages, v_pages, block_table)."""
    b, hkv, s_max, d = k_cache.shape
    max_blocks = s_max // block_size
    num_blocks = b * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[: b * max_blocks]
    block_table = perm.view(b, max_blocks).to(torch.int32)
    k_pages = torch.full((num_blocks, hkv, block_size, d), 1e4, dtype=k_cache.dtype)
    v_pages = torch.full((num_blocks, hkv, block_size, d), float("nan"), dtype=k_cache.dtype)
    for bi in range(b):
        for i in range(max_blocks):
            sl = slice(i * block_size, (i + 1) * block_size)
            k_pages[block_table[bi, i]] = k_cache[bi, :, sl]
            v_pages[block_table[bi, i]] = v_cache[bi, :, sl]
    return k_pages, v_pages, block_table


@interp_only
@pytest.mark.parametrize(
    "dtype, block_size, softcap, num_splits, d",
    [
        (torch.bfloat16, 16, None, 3, 128),
        (torch.float32, 16, 2.0, None, 64),
        (torch.float16, 5, None, 4, 80),  # pages smaller than a tile, tiles across pages
        (torch.bfloat16, 32, 2.0, 1, 40),
    ],
    ids=["bf16-bs16", "fp32-bs16-softcap", "fp16-bs5", "bf16-bs32-softcap-1split"],
)
def test_paged_bitwise_equals_contiguous(dtype, block_size, softcap, num_splits, d):
    b, hq, hkv = 4, 6, 2
    s_max = block_size * (160 // block_size)
    q, k, v = decode_inputs(b, hq, hkv, s_max, d, dtype, seed=block_size + d, mult=3.0 if softcap else 1.0)
    seq_lens = torch.tensor([s_max, 0, 1, s_max - block_size - 3], dtype=torch.int32)
    k_pages, v_pages, block_table = to_pages(k, v, block_size, seed=d)
    out_c = torch.empty_like(q)
    decode_attention_fwd(out_c, q, k, v, seq_lens, d**-0.5, softcap=softcap, num_splits=num_splits)
    out_p = torch.full_like(q, float("nan"))
    paged_decode_attention_fwd(out_p, q, k_pages, v_pages, block_table, seq_lens, d**-0.5, softcap=softcap,
                               num_splits=num_splits)  # fmt: skip
    assert torch.equal(out_p, out_c)
    ref = decode_reference(q, k, v, seq_lens, d**-0.5, softcap)
    base = decode_reference(q, k, v, seq_lens, d**-0.5, softcap, compute_dtype=dtype, sdpa=softcap is None)
    assert_close_2x(out_p, ref, base.to(dtype))


@interp_only
@pytest.mark.parametrize("window", [1, 19, 100])
def test_decode_sliding_window(window):
    """The token sees its last `window` keys; paged == contiguous bitwise even where the
    block table's entries before the window are garbage (never read)."""
    b, hq, hkv, d, block_size = 4, 6, 2, 64, 16
    s_max = 160
    q, k, v = decode_inputs(b, hq, hkv, s_max, d, torch.bfloat16, seed=window)
    seq_lens = torch.tensor([160, 0, 1, 77], dtype=torch.int32)
    out_c = torch.empty_like(q)
    decode_attention_fwd(out_c, q, k, v, seq_lens, 0.125, num_splits=2, window=window)
    lo = (seq_lens - window).clamp(min=0)
    ref = torch.stack([decode_reference(q[i : i + 1], k[i : i + 1, :, lo[i] :], v[i : i + 1, :, lo[i] :],
                                        seq_lens[i : i + 1] - lo[i], 0.125, None)[0] for i in range(b)])  # fmt: skip
    base = torch.stack([decode_reference(q[i : i + 1], k[i : i + 1, :, lo[i] :], v[i : i + 1, :, lo[i] :],
                                         seq_lens[i : i + 1] - lo[i], 0.125, None, torch.bfloat16, True)[0]
                        for i in range(b)])  # fmt: skip
    assert_close_2x(out_c, ref, base.to(torch.bfloat16))
    k_pages, v_pages, block_table = to_pages(k, v, block_size, seed=3)
    for i in range(b):
        block_table[i, : int(lo[i]) // block_size] = 10_000  # out of range: must not be read
    out_p = torch.full_like(q, float("nan"))
    paged_decode_attention_fwd(out_p, q, k_pages, v_pages, block_table, seq_lens, 0.125, num_splits=2, window=window)
    assert torch.equal(out_p, out_c)
    assert device_errors.take("cpu") == 0, "an entry that is never read is not checked either"


# ---------------------------------------------------------------------------------------
# Config choice and misuse


def test_default_num_splits_and_buckets():
    ta = triton_attention
    split = ta.default_num_splits
    per = ta.MIN_KEYS_PER_SPLIT  # 256
    # one program per split (B = 1, one kv head): the length decides, up to MAX_SPLITS
    assert [split(n) for n in (0, 1, per, per + 1, 5 * per)] == [1, 1, 1, 2, 5]
    assert split(1 << 20) == ta.MAX_SPLITS
    # B * Hkv programs per split: splits until DECODE_TARGET_PROGRAMS programs in all
    assert split(32768, 8) == ta.DECODE_TARGET_PROGRAMS // 8 == 32  # Llama-3-8B, B 1
    assert split(4096, 8) == 16  # 256 keys each
    assert split(32768, 64 * 8) == 1  # B 64: the batch fills the GPU
    assert split(32768, 100) == 3
    assert [triton_attention.block_d_for(d) for d in (1, 32, 40, 64, 80, 96, 128, 129, 256)] == [
        32, 32, 64, 64, 128, 128, 128, 256, 256,
    ]  # fmt: skip


def test_launchers_only_pick_shipped_configs():
    """On a GPU (DOT_FP32 off) every launch plan is in SHIPPED_CONFIGS."""
    ta = triton_attention
    shipped = {
        (c["kernel"].__name__, tuple(c["signature"].items()), tuple(c["constexprs"].items()), c["num_warps"])
        for c in ta.SHIPPED_CONFIGS
    }
    assert len(shipped) == len(ta.SHIPPED_CONFIGS)
    for dtype in DTYPES:
        for d in (1, 16, 40, 64, 80, 96, 128, 200, 256):
            specs = [ta._stage2_spec(dtype, d)]
            specs += [ta._decode_spec(dtype, d, sc, paged, aligned=al)
                      for sc in (False, True) for paged in (False, True) for al in (False, True)]  # fmt: skip
            specs += [ta._flash_spec(dtype, d, c, sc, lse, vl, window=w, aligned=al)
                      for c, w in ((False, False), (True, False), (True, True)) for sc in (False, True)
                      for lse in (False, True) for vl in (False, True) for al in (False, True)]  # fmt: skip
            specs.append(ta._write_kv_spec(dtype, d))
            for kernel, sig, cexp, nw in specs:
                assert (kernel.__name__, tuple(sig.items()), tuple(cexp.items()), nw) in shipped, (dtype, d, cexp)


def test_prefill_takes_the_aligned_tile_only_when_the_jit_sees_alignment(monkeypatch):
    """16-bit D 128 with every q / k / v / out stride and pointer a multiple of 16 takes the
    128-row tile; an odd stride anywhere (here k / v rows padded by 8 elements) or an odd D
    the worst-case tile, and fp32 its own."""
    ta = triton_attention
    picked = []
    monkeypatch.setattr(ta, "launch", lambda kernel, grid, *a, **kw: picked.append(kw.get("BLOCK_M")))
    g = torch.Generator().manual_seed(1)
    for dtype, d, pad, aligned, want in ((torch.bfloat16, 128, 0, True, 128), (torch.float16, 112, 0, True, 128),
                                         (torch.bfloat16, 128, 8, False, 64), (torch.bfloat16, 120, 0, False, 64),
                                         (torch.float32, 128, 0, True, ta._FLASH_TILES[(False, 128)][0])):  # fmt: skip
        q = make((1, 2, 8, d), dtype, g)
        kv = make((1, 2, 8, d + pad), dtype, g)[..., :d]
        assert ta.jit_aligned(d, (q, kv)) == aligned
        flash_attention_fwd(torch.empty_like(q), q, kv, kv, 0.1, True)
        assert picked.pop() == want, (dtype, d, pad)
    q = make((4, 2, 128), torch.bfloat16, g)  # varlen: [T, H, D]
    cu = torch.tensor([0, 4], dtype=torch.int32)
    ta.flash_attention_varlen_fwd(torch.empty_like(q), q, q, q, cu, cu, 4, 0.1, True)
    assert picked.pop() == 128


def test_decode_takes_the_aligned_tile_only_when_the_jit_sees_alignment(monkeypatch):
    """Stage 1 on packed 16-bit D 128 caches (contiguous or paged) takes the aligned tile;
    a cache whose rows are padded by 8 elements, or D 120, the worst-case one."""
    ta = triton_attention
    picked = []
    monkeypatch.setattr(ta, "launch", lambda kernel, grid, *a, **kw: picked.append((kw.get("BLOCK_N"),
                                                                                     kw.get("num_warps"))))
    g = torch.Generator().manual_seed(2)
    lens = torch.tensor([5], dtype=torch.int32)
    for d, pad, tiles in ((128, 0, ta._DECODE_ALIGNED_TILES), (128, 8, ta._DECODE_TILES), (120, 0, ta._DECODE_TILES)):
        q = make((1, 4, d), torch.bfloat16, g)
        kv = make((1, 2, 16, d + pad), torch.bfloat16, g)[..., :d]
        ta.decode_attention_fwd(torch.empty_like(q), q, kv, kv, lens, 0.1)
        assert picked[-2] == tiles[(True, 128)], (d, pad)  # [-1] is stage 2
        ta.paged_decode_attention_fwd(torch.empty_like(q), q, kv, kv, torch.zeros(1, 1, dtype=torch.int32), lens, 0.1)
        assert picked[-2] == tiles[(True, 128)], (d, pad, "paged")  # [-3] the block check, [-1] stage 2


def test_rejects_bad_inputs():
    q = torch.randn(1, 4, 8, 64)
    k = torch.randn(1, 2, 8, 64)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_fwd(out.double(), q.double(), k.double(), k.double(), 0.1, False)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_fwd(out, q, k.half(), k.half(), 0.1, False)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention_fwd(torch.empty(1, 3, 8, 64), torch.randn(1, 3, 8, 64), k, k, 0.1, False)
    with pytest.raises(ValueError, match="inner stride"):
        flash_attention_fwd(out, torch.randn(1, 4, 64, 8).transpose(-1, -2), k, k, 0.1, False)
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(1, 1, 2, 300)
        flash_attention_fwd(torch.empty_like(x), x, x, x, 0.1, False)
    with pytest.raises(ValueError, match="softcap"):
        flash_attention_fwd(out, q, k, k, 0.1, False, softcap=0.0)
    with pytest.raises(ValueError, match="lse"):
        flash_attention_fwd(out, q, k, k, 0.1, False, lse=torch.empty(1, 4, 7))
    with pytest.raises(ValueError, match="k and v"):
        flash_attention_fwd(out, q, k, torch.randn(1, 2, 9, 64), 0.1, False)
    qd = torch.randn(2, 4, 64)
    kc = torch.randn(2, 2, 16, 64)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention_fwd(torch.empty_like(qd), qd, kc, kc, lens.long(), 0.1)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention_fwd(torch.empty_like(qd), qd, kc, kc, lens, 0.1, num_splits=0)
    with pytest.raises(ValueError, match="block_table"):
        paged_decode_attention_fwd(torch.empty_like(qd), qd, kc, kc, torch.zeros(2, 3), lens, 0.1)


# ---------------------------------------------------------------------------------------
# On a GPU: the compiled kernels (fp16/bf16 tensor-core dots, P rounded to the input dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_gpu_flash_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    for (sq, sk, causal, softcap, d) in [(257, 1000, True, None, 128), (300, 300, False, 20.0, 80),
                                         (129, 77, True, None, 64), (64, 513, True, 50.0, 256)]:  # fmt: skip
        q, k, v = make((2, 8, sq, d), dtype, g), make((2, 2, sk, d), dtype, g), make((2, 2, sk, d), dtype, g)
        qc, kc, vc = q.cuda(), k.cuda(), v.cuda()
        out = torch.empty_like(qc)
        lse = torch.empty(qc.shape[:3], device="cuda")
        flash_attention_fwd(out, qc, kc, vc, d**-0.5, causal, softcap=softcap, lse=lse)
        ref, ref_lse = reference(q, k, v, d**-0.5, causal, softcap)
        base = torch_baseline(qc, kc, vc, d**-0.5, causal, softcap).cpu()
        rows = torch.arange(sq) >= max(sq - sk, 0) if causal else None
        if rows is not None:
            out_c, ref, base = out.cpu()[:, :, rows], ref[:, :, rows], base[:, :, rows]
        else:
            out_c = out.cpu()
        assert_close_2x(out_c, ref, base)
        assert_lse(lse.cpu(), ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_gpu_decode_and_paged_bitwise(dtype):
    b, hq, hkv, d, bs = 5, 8, 2, 128, 16
    s_max = 64 * bs
    q, k, v = decode_inputs(b, hq, hkv, s_max, d, dtype, seed=2)
    seq_lens = torch.tensor([0, 1, s_max, 700, 33], dtype=torch.int32)
    k_pages, v_pages, block_table = to_pages(k, v, bs, seed=3)
    out_c = torch.empty_like(q).cuda()
    out_p = torch.empty_like(q).cuda()
    for splits in (None, 1, 5):
        decode_attention_fwd(out_c, q.cuda(), k.cuda(), v.cuda(), seq_lens.cuda(), d**-0.5, num_splits=splits)
        paged_decode_attention_fwd(out_p, q.cuda(), k_pages.cuda(), v_pages.cuda(), block_table.cuda(),
                                   seq_lens.cuda(), d**-0.5, num_splits=splits)  # fmt: skip
        assert torch.equal(out_p, out_c)
        ref = decode_reference(q, k, v, seq_lens, d**-0.5, None)
        base = decode_reference(q.cuda(), k.cuda(), v.cuda(), seq_lens, d**-0.5, None, dtype, True).cpu()
        assert_close_2x(out_c.cpu(), ref, base.to(dtype))
