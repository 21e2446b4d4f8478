"""In-place writes and autograd: an op that writes a tensor in place refuses inputs that
autograd would have to follow through the write, and bumps the version counter of what it
writes, as torch's own in-place ops do. Without that, a rotated projection gave silently
wrong gradients, and a tensor saved for backward could be overwritten unnoticed."""

from __future__ import annotations

import pytest
import torch

from ringfuse import ops

from .test_write_kv import _decode_step_inputs


def _rope_inputs():
    cos_sin = ops.cos_sin_cache(8, 16)
    return torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.tensor([1, 2, 3]), cos_sin


def test_rotary_refuses_autograd_and_marks_its_writes():
    q, k, pos, cos_sin = _rope_inputs()
    x = torch.randn(3, 32, requires_grad=True)
    with pytest.raises(ValueError, match="rotated in place, which autograd cannot follow"):
        ops.rotary_embedding((x @ torch.randn(32, 32)).view(3, 2, 16), None, pos, cos_sin)
    with torch.no_grad():  # the documented way: fine, and the result is what torch computes
        ops.rotary_embedding((x @ torch.randn(32, 32)).view(3, 2, 16), None, pos, cos_sin)
    # a tensor saved for backward by torch, then rotated: backward must refuse, as after any in-place op
    w = torch.randn(3, 2, 16, requires_grad=True)
    y = (q * w).sum()  # saves q
    before = (q._version, k._version)
    ops.rotary_embedding(q, k, pos, cos_sin)
    assert q._version > before[0] and k._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_write_kv_refuses_autograd_and_marks_the_caches():
    k, v = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    k_cache, v_cache = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="written in place, which autograd cannot follow"):
        ops.write_kv(k.requires_grad_(), v, k_cache, v_cache, slots)
    k.requires_grad_(False)
    before = (k_cache._version, v_cache._version)
    ops.write_kv(k, v, k_cache, v_cache, slots)
    assert k_cache._version > before[0] and v_cache._version > before[1]


def test_in_place_norm_and_out_arguments_mark_their_writes():
    x, res, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    before = (x._version, res._version)
    ops.add_rms_norm_(x, res, w)
    assert x._version > before[0] and res._version > before[1]
    out = torch.empty(4, 16)
    for call in (lambda: ops.rms_norm(x, w, out=out), lambda: ops.layer_norm(x, w, out=out)):
        v0 = out._version
        call()
        assert out._version > v0
    q, kc = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8)
    lens = torch.tensor([5, 3], dtype=torch.int32)
    out = torch.empty(2, 4, 8)
    for kw in ({}, {"scale": 0.5}):  # the unchecked plain call and the checked one
        v0 = out._version
        ops.decode_attention(q, kc, kc, lens, out=out, **kw)
        assert out._version > v0


def test_paged_decode_plan_refuses_autograd_and_marks_its_writes():
    k_pages, v_pages, table, lens, pos, slots, qkv, cos_sin = _decode_step_inputs(2, 4, 2, 16, 4, torch.float32, 0)
    plan = ops.PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, 4)
    with pytest.raises(ValueError, match="which autograd cannot follow"):
        plan.run_packed(qkv.clone().requires_grad_(), k_pages, v_pages)
    q, k, v = qkv[:, :64].view(2, 4, 16), qkv[:, 64:96].view(2, 2, 16), qkv[:, 96:].view(2, 2, 16)
    with pytest.raises(ValueError, match="which autograd cannot follow"):
        plan.run(q, k, v.clone().requires_grad_(), k_pages, v_pages)
    before = (qkv._version, k_pages._version, v_pages._version)
    plan.run_packed(qkv, k_pages, v_pages)
    after = (qkv._version, k_pages._version, v_pages._version)
    assert all(a > b for a, b in zip(after, before))


def test_prepared_objects_and_rotary_with_k_trace_under_torch_compile():
    """fullgraph tracing reached data_ptr() / version reads (the q/k memory check, the
    prepared objects' watches) before the is_compiling() fallbacks and failed."""
    q, k, pos, cos_sin = _rope_inputs()

    def rope(q, k):
        ops.rotary_embedding(q, k, pos, cos_sin)
        return q * 1, k * 1

    want = rope(q.clone(), k.clone())
    got = torch.compile(rope, fullgraph=True, backend="aot_eager")(q.clone(), k.clone())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="q and k share memory"):  # checked by the op's kernel when compiled
        torch.compile(rope, fullgraph=True, backend="aot_eager")(q, q[:, :1])

    w, b, x = torch.randn(6, 16), torch.randn(6), torch.randn(3, 16)
    w_q, w_s = torch.randint(-127, 128, (6, 16), dtype=torch.int8), torch.rand(6) * 0.02
    prepared = {
        "linear": (ops.prepare_linear(w, b), lambda t: ops.linear(t, w, b)),
        "w8a16": (ops.prepare_int8_weight_only_linear(w_q, w_s, b),
                  lambda t: ops.int8_weight_only_linear(t, w_q, w_s, b)),
        "w8a8": (ops.prepare_int8_linear(w_q, w_s, b), lambda t: ops.w8a8_linear(t, w_q, w_s, b)),
    }  # fmt: skip
    for name, (fn, eager) in prepared.items():
        got = torch.compile(lambda t: fn(t) * 1, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(got, eager(x)), name
    norm = ops.prepare_rms_norm(torch.randn(16))
    x, res = torch.randn(3, 16), torch.randn(3, 16)
    want = ops.add_rms_norm_(x.clone(), res.clone(), norm.weight)
    got = torch.compile(lambda a, r: norm.add_(a, r), fullgraph=True, backend="aot_eager")(x, res)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_refused_calls_bump_nothing():
    """Versions go up after the kernel ran, so a call refused by a check (in Python or in the
    kernel) leaves them as they were (a refused call re-prepared what watched them)."""
    x, res, w, o = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16), torch.empty(4, 16)
    with pytest.raises(ValueError):
        ops.add_rms_norm(x, res, w, out=o, residual_out=o)  # out and residual_out share memory
    assert o._version == 0
    q, k, _, cos_sin = _rope_inputs()
    with pytest.raises(ValueError, match="positions"):
        ops.rotary_embedding(q, k, torch.tensor([1, 2, 99]), cos_sin)  # refused by the kernel
    assert q._version == k._version == 0
    k_cache = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="slot"):
        ops.write_kv(torch.randn(1, 1, 8), torch.randn(1, 1, 8), k_cache, k_cache.clone(), torch.tensor([7]))
    assert k_cache._version == 0
