"""The ops' CUDA paths without a GPU: FakeCuda tensors (tests/fake_cuda.py) take them, and
the Triton kernels run under the interpreter. The unchecked shortcuts (the norms' plain
calls, PagedDecodePlan's runs) must launch what the checked ops launch: same bits."""

from __future__ import annotations

import sys

import pytest
import torch

from ringfuse import ops

from ..fake_cuda import as_cuda, interp_only

pytestmark = interp_only

rms_mod = sys.modules["ringfuse.ops.rms_norm"]
ln_mod = sys.modules["ringfuse.ops.layer_norm"]


def _norm_inputs(dtype, shape=(3, 40)):
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    w, b = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype), torch.randn(shape[-1], generator=g).to(dtype)
    return x, r, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_cuda_norm_calls_skip_the_checks_with_the_checked_bits(dtype, monkeypatch):
    """Contiguous calls with everything on x's device (ops/_common.plain_call) launch the
    Triton kernels without the ops' checks (the checked path is made to fail) and give the
    checked path's bits."""
    x, r, w, b = _norm_inputs(dtype)
    want = {
        "rms": rms_mod._forward(as_cuda(x), as_cuda(w), 1e-6, False)[0],
        "rms llama": rms_mod._forward(as_cuda(x), as_cuda(w), 1e-6, True)[0],
        "add_rms": rms_mod._forward(as_cuda(x), as_cuda(w), 1e-6, False, residual=as_cuda(r)),
        "ln": ln_mod._forward(as_cuda(x), as_cuda(w), as_cuda(b), 1e-5)[0],
        "add_ln": ln_mod._forward(as_cuda(x), as_cuda(w), as_cuda(b), 1e-5, residual=as_cuda(r)),
    }
    monkeypatch.setattr(rms_mod, "_forward", lambda *a, **k: pytest.fail("took the checked path"))
    monkeypatch.setattr(ln_mod, "_forward", lambda *a, **k: pytest.fail("took the checked path"))
    xc, rc, wc, bc = (as_cuda(t) for t in (x, r, w, b))
    assert torch.equal(ops.rms_norm(xc, wc, 1e-6), want["rms"])
    assert torch.equal(ops.rms_norm(xc, wc, 1e-6, cast_mode="llama"), want["rms llama"])
    for got, expect in zip(ops.add_rms_norm(xc, rc, wc, 1e-6), want["add_rms"]):
        assert torch.equal(got, expect)
    assert torch.equal(ops.layer_norm(xc, wc, bc, 1e-5), want["ln"])
    for got, expect in zip(ops.add_layer_norm(xc, rc, wc, bc, 1e-5), want["add_ln"]):
        assert torch.equal(got, expect)
    # out= and residual_out= in place on the residual
    out, s = as_cuda(torch.empty_like(x)), as_cuda(r.clone())
    ops.add_rms_norm(xc, s, wc, 1e-6, out=out, residual_out=s)
    assert torch.equal(out, want["add_rms"][0]) and torch.equal(s, want["add_rms"][1])


def _plan_inputs(dtype, batch=3, hq=4, hkv=2, d=32, block_size=4, num_blocks=12):
    g = torch.Generator().manual_seed(11)
    k_pages = torch.randn(num_blocks, hkv, block_size, d, generator=g).to(dtype)
    v_pages = torch.randn(num_blocks, hkv, block_size, d, generator=g).to(dtype)
    seq_lens = torch.tensor([5, 9, 1], dtype=torch.int32)[:batch]
    block_table = torch.randperm(num_blocks, generator=g)[: batch * 3].view(batch, 3).to(torch.int32)
    positions = (seq_lens - 1).to(torch.int32)  # int32: the plan keeps int64 copies
    slots = torch.stack([block_table[i, (positions[i] // block_size).item()] * block_size + positions[i] % block_size
                         for i in range(batch)]).to(torch.int64)  # fmt: skip
    cos_sin = ops.cos_sin_cache(64, d)
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, generator=g).to(dtype)
    return k_pages, v_pages, cos_sin, positions, slots, block_table, seq_lens, qkv, (hq, hkv, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 3])
def test_decode_plan_cuda_launches_are_the_three_ops(dtype, window):
    """PagedDecodePlan's CUDA launches (rotary, write_kv, paged decode attention on views
    into one qkv tensor) give the three ops' bits: output, rotated q / k, both caches."""
    k_pages, v_pages, cos_sin, positions, slots, block_table, seq_lens, qkv, (hq, hkv, d) = _plan_inputs(dtype)
    batch = qkv.shape[0]
    # the three ops, each checked, on CUDA-path tensors
    heads = qkv.clone().view(batch, hq + 2 * hkv, d)
    q, k, v = (as_cuda(t) for t in (heads[:, :hq], heads[:, hq : hq + hkv], heads[:, hq + hkv :]))
    kp_ops, vp_ops = as_cuda(k_pages.clone()), as_cuda(v_pages.clone())
    ops.rotary_embedding(q, k, as_cuda(positions), as_cuda(cos_sin))
    ops.write_kv(k, v, kp_ops, vp_ops, as_cuda(slots))
    want = ops.paged_decode_attention(q, kp_ops, vp_ops, as_cuda(block_table), as_cuda(seq_lens),
                                      window=window)  # fmt: skip
    # the plan's launches on the same inputs
    kp, vp = as_cuda(k_pages.clone()), as_cuda(v_pages.clone())
    plan = ops.PagedDecodePlan(kp, vp, as_cuda(cos_sin), as_cuda(positions), as_cuda(slots), as_cuda(block_table),
                               as_cuda(seq_lens), hq)  # fmt: skip
    assert plan.cuda and plan._direct
    packed = as_cuda(qkv.clone())
    rows = (packed.stride(0), d)
    got = plan._launch_cuda(packed, 0, rows, packed, hq * d, rows, packed, (hq + hkv) * d, rows, kp, vp, window or 0)
    assert torch.equal(got, want)
    assert torch.equal(packed.view(batch, hq + 2 * hkv, d), heads)  # q and k rotated alike, v untouched
    assert torch.equal(kp, kp_ops) and torch.equal(vp, vp_ops)
    # and within the tolerance of the CPU plan (the C++ kernels)
    cpu_plan = ops.PagedDecodePlan(k_pages, v_pages, cos_sin, positions, slots, block_table, seq_lens, hq)
    cpu = cpu_plan.run_packed(qkv.clone(), k_pages, v_pages, window=window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), cpu.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_ops_on_cuda_launch_what_the_checked_launchers_do(dtype):
    """ops.decode_attention / paged_decode_attention check their inputs once and call the
    launchers' unchecked entries: the bits of the checked launchers (kernels/attention.py)."""
    from ringfuse.kernels import attention as tk

    k_pages, v_pages, _, _, _, block_table, seq_lens, qkv, (hq, hkv, d) = _plan_inputs(dtype)
    q = qkv[:, : hq * d].reshape(-1, hq, d).contiguous()
    scale = d**-0.5
    want = torch.empty_like(q)
    tk.paged_decode_attention_fwd(want, q, k_pages, v_pages, block_table, seq_lens, scale)
    got = ops.paged_decode_attention(as_cuda(q), as_cuda(k_pages), as_cuda(v_pages), as_cuda(block_table),
                                     as_cuda(seq_lens))  # fmt: skip
    assert torch.equal(got, want)
    # contiguous caches [B, Hkv, S_max, D], with a window
    def contiguous(pages):  # [B, 3 blocks, Hkv, block_size, D] -> [B, Hkv, 3 * block_size, D]
        return pages[block_table.long()].transpose(1, 2).reshape(q.shape[0], hkv, -1, d)

    k_cache, v_cache = contiguous(k_pages), contiguous(v_pages)
    want = torch.empty_like(q)
    tk.decode_attention_fwd(want, q, k_cache, v_cache, seq_lens, scale, window=3)
    got = ops.decode_attention(as_cuda(q), as_cuda(k_cache), as_cuda(v_cache), as_cuda(seq_lens), window=3)
    assert torch.equal(got, want)
