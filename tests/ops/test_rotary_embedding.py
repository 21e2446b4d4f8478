"""ringfuse.ops.rotary_embedding (in place) vs an fp64 reference of both pair layouts."""

import pytest
import torch

from ringfuse.ops import DeviceValueError, check_device_errors, cos_sin_cache, rotary_embedding

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference64(x, positions, cache, gptj):
    """fp64 rotation of the first rot_dim dims of every head row of x [T, H, D]."""
    rot = cache.shape[1]
    half = rot // 2
    cos = cache[positions.long(), :half].double()[:, None, :]  # [T, 1, rot/2]
    sin = cache[positions.long(), half:].double()[:, None, :]
    y = x.double().clone()
    if gptj:
        a, b = y[..., 0:rot:2].clone(), y[..., 1:rot:2].clone()
        y[..., 0:rot:2], y[..., 1:rot:2] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = y[..., :half].clone(), y[..., half:rot].clone()
        y[..., :half], y[..., half:rot] = a * cos - b * sin, b * cos + a * sin
    return y


def check(got, x_before, positions, cache, gptj):
    ref = reference64(x_before, positions, cache, gptj)
    # torch's own same-dtype computation: the same formula evaluated in x's dtype
    same = reference64(x_before, positions, cache, gptj).to(x_before.dtype)  # one rounding: the best possible
    err = (got.double() - ref).abs().max().item()
    floor = torch.finfo(got.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * (same.double() - ref).abs().max().item() + floor, err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("heads,d,rot", [(9, 64, 64), (3, 64, 64), (4, 128, 64), (2, 80, 80), (1, 10, 6), (5, 22, 22)])
def test_matches_reference(isa, dtype, style, heads, d, rot):
    g = torch.Generator().manual_seed(heads * d)
    T = 13
    q = torch.randn(T, heads, d, generator=g).to(dtype)
    k = torch.randn(T, max(1, heads // 3), d, generator=g).to(dtype)
    positions = torch.randint(0, 500, (T,), generator=g)
    cache = cos_sin_cache(512, rot, base=1e5)
    q0, k0 = q.clone(), k.clone()
    rq, rk = rotary_embedding(q, k, positions, cache, style=style)
    assert rq is q and rk is k
    check(q, q0, positions, cache, style == "gptj")
    check(k, k0, positions, cache, style == "gptj")
    if rot < d:  # dims past rot_dim are untouched
        assert torch.equal(q[..., rot:], q0[..., rot:])


def test_matches_hf_llama_rotary():
    """neox style equals HF's apply_rotary_pos_emb with HF's rotary cos/sin."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=576, num_attention_heads=9, rope_theta=1e5, max_position_embeddings=256)
    rope = LlamaRotaryEmbedding(cfg)
    T = 7
    q, k = torch.randn(1, 9, T, 64), torch.randn(1, 3, T, 64)
    pos = torch.arange(40, 40 + T)[None]
    cos, sin = rope(q, pos)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    oq, ok = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()  # [T, H, D]
    rotary_embedding(oq, ok, pos[0], cos_sin_cache(256, 64, base=1e5))
    torch.testing.assert_close(oq, hq[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ok, hk[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_views_of_a_fused_qkv_and_no_k():
    qkv = torch.randn(6, 9 + 3 + 3, 64)
    q, k = qkv[:, :9], qkv[:, 9:12]  # strided views: rotated in place inside qkv
    v_before = qkv[:, 12:].clone()
    q0, k0 = q.clone(), k.clone()
    pos = torch.arange(6)
    cache = cos_sin_cache(16, 64)
    rotary_embedding(q, k, pos, cache)
    check(qkv[:, :9], q0, pos, cache, False)
    check(qkv[:, 9:12], k0, pos, cache, False)
    assert torch.equal(qkv[:, 12:], v_before)
    q2 = q0.clone()
    rotary_embedding(q2, None, pos, cache)
    check(q2, q0, pos, cache, False)


def test_bad_inputs():
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    q_before, k_before = q.clone(), k.clone()
    cache = cos_sin_cache(16, 8)
    with pytest.raises(ValueError, match=r"positions\[1\] = 16 outside \[0, 16\)"):
        rotary_embedding(q, k, torch.tensor([0, 16, 1, 2]), cache)
    with pytest.raises(ValueError, match=r"positions\[0\] = 0 outside \[0, 0\)"):  # was "_C: null pointer"
        rotary_embedding(q, k, torch.tensor([0, 1, 2, 3]), cache[:0])
    with pytest.raises(ValueError, match=r"positions\[0\] = -1"):
        rotary_embedding(q, k, torch.tensor([-1, 0, 1, 2]), cache)
    with pytest.raises(TypeError, match="positions must be an int64 or int32"):
        rotary_embedding(q, k, torch.zeros(4), cache)
    with pytest.raises(ValueError, match=r"positions must have shape \(4,\)"):
        rotary_embedding(q, k, torch.zeros(3, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="style"):
        rotary_embedding(q, k, torch.zeros(4, dtype=torch.int64), cache, style="half")
    with pytest.raises(ValueError, match="rot_dim must be even and <= head_dim"):
        rotary_embedding(q, k, torch.zeros(4, dtype=torch.int64), cos_sin_cache(16, 10))
    with pytest.raises(TypeError, match="float32"):
        rotary_embedding(q, k, torch.zeros(4, dtype=torch.int64), cache.double())
    with pytest.raises(ValueError, match="k must have q's dtype"):
        rotary_embedding(q, k.half(), torch.zeros(4, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="unit stride"):
        rotary_embedding(torch.randn(4, 8, 2).transpose(1, 2), None, torch.zeros(4, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="rot_dim must be an even int"):
        cos_sin_cache(16, 7)
    for base in (0, -10000.0, float("nan"), float("inf"), "1e4", True):  # a NaN cache rotated q to NaN
        with pytest.raises(ValueError, match="base must be a finite number > 0"):
            cos_sin_cache(16, 8, base=base)
    # nothing was written by the failed calls
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


@pytest.mark.gpu
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_cuda_matches_cpu(style):
    """CUDA tensors go to the Triton kernel: same rotation as the CPU kernel; positions
    outside the cache are left unrotated and reported by check_device_errors (no sync)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(9, 8, 64, generator=g).bfloat16(), torch.randn(9, 2, 64, generator=g).bfloat16()
    positions = torch.tensor([0, 1, 2, 7, 7, 30, 4, 5, 6])
    cache = cos_sin_cache(32, 64, base=1e5)
    q_gpu, k_gpu = q.cuda(), k.cuda()
    rotary_embedding(q_gpu, k_gpu, positions.cuda(), cache.cuda(), style=style)
    rotary_embedding(q, k, positions, cache, style=style)
    torch.testing.assert_close(q_gpu.cpu().float(), q.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(k_gpu.cpu().float(), k.float(), atol=1e-2, rtol=0)
    check_device_errors()
    before = q_gpu.clone()
    rotary_embedding(q_gpu, k_gpu, (positions + 100).cuda(), cache.cuda(), style=style)
    assert torch.equal(q_gpu, before)
    with pytest.raises(DeviceValueError, match="position outside"):
        check_device_errors()


def test_refuses_memory_it_would_rotate_twice():
    cache = cos_sin_cache(16, 8, base=10000.0)
    q = torch.randn(3, 2, 8)
    pos = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="q and k share memory"):
        rotary_embedding(q, q, pos, cache)
    with pytest.raises(ValueError, match="q and k share memory"):
        rotary_embedding(q, q[:, 1:], pos, cache)
    with pytest.raises(ValueError, match="q's \\(token, head\\) rows overlap"):
        rotary_embedding(q[:, :1].expand(3, 4, 8), None, pos, cache)
    with pytest.raises(ValueError, match="k's \\(token, head\\) rows overlap"):
        rotary_embedding(q, torch.randn(1, 1, 8).expand(3, 1, 8), pos, cache)
    # q and k as views of one fused projection interleave their spans, not their elements
    qkv = torch.randn(3, 4 * 8)
    heads = qkv.view(3, 4, 8)
    want_q, want_k = heads[:, :2].clone(), heads[:, 2:3].clone()
    rotary_embedding(want_q, want_k, pos, cache)
    rotary_embedding(heads[:, :2], heads[:, 2:3], pos, cache)
    assert torch.equal(heads[:, :2], want_q) and torch.equal(heads[:, 2:3], want_k)
