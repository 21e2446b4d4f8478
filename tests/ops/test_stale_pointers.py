"""Objects that cache data pointers (prepared ops, packed weights, decode plans, CPU graphs)
against a caller who swaps, resizes, frees or rewrites the tensors behind them: every case
gives the right result for the current values or a clear error, never a read of freed
memory (each of these crashed or read garbage before).

References are plain torch math on the tensors' current values."""

import gc

import pytest
import torch
import torch.nn.functional as F

from ringfuse import ops
from ringfuse.nn import Int8Linear

from .test_write_kv import _decode_step_inputs


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same inputs every run: a failure reproduces


def _churn():
    """Free and reallocate memory so that a dangling pointer would read other data."""
    gc.collect()
    return [torch.full((4096,), 7.0) for _ in range(64)]


def test_prepared_linear_follows_a_swapped_weight():
    x = torch.randn(1, 4096)
    w = torch.randn(4096, 4096)
    lin = ops.prepare_linear(w)
    w.data = torch.zeros(1)  # the prepared weight's memory is freed here
    _churn()
    with pytest.raises(ValueError, match="prepare_linear: weight must be 2-D"):
        lin(x)
    w2 = torch.randn(300, 4096)
    w.data = w2  # a valid new weight: used as it is now
    torch.testing.assert_close(lin(x), F.linear(x, w2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_prepared_linear_sees_in_place_writes_even_through_a_private_copy(bias):
    w = torch.randn(64, 96)[:, ::2]  # inner stride 2: prepared as a private contiguous copy
    b = torch.randn(64) if bias else None
    lin = ops.prepare_linear(w, b)
    x = torch.randn(3, 48)
    torch.testing.assert_close(lin(x), F.linear(x, w, b))
    with torch.no_grad():
        w.mul_(-2)
        if bias:
            b.add_(1)
    torch.testing.assert_close(lin(x), F.linear(x, w, b))


def test_prepared_int8_weight_only_linear_follows_its_tensors():
    w_q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    scale = torch.rand(32) + 0.1
    lin = ops.prepare_int8_weight_only_linear(w_q, scale)
    x = torch.randn(2, 64)
    ref = lambda: x @ (w_q.float() * scale[:, None]).T  # noqa: E731
    close = lambda got, want: torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # noqa: E731
    close(lin(x), ref())
    scale.data = torch.rand(32) + 2.0  # swapped
    w_q.data = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    _churn()
    close(lin(x), ref())
    w_q.data = torch.zeros(16, 64, dtype=torch.int8)  # no longer matches w_scale [32]
    with pytest.raises(ValueError, match="w_scale must have shape"):
        lin(x)


def test_prepared_rms_norm_follows_a_swapped_weight():
    w = torch.randn(64)
    norm = ops.prepare_rms_norm(w, 1e-6)
    w.data = torch.randn(8)  # shorter: the old pointer would read past its end
    x, r = torch.randn(2, 64), torch.randn(2, 64)
    with pytest.raises(ValueError, match="weight"):
        norm.add_(x, r)
    w.data = torch.randn(64)
    x, r = torch.randn(2, 64), torch.randn(2, 64)
    want_r = x + r
    want = F.rms_norm(want_r, (64,), w, 1e-6)
    got, got_r = norm.add_(x.clone(), r.clone())
    torch.testing.assert_close(got_r, want_r)
    torch.testing.assert_close(got, want)


def test_packed_int8_weight_goes_stale_and_int8_linear_repacks():
    b_q = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    packed = ops.pack_int8_weight(b_q)
    a_q = torch.randint(-127, 128, (3, 32), dtype=torch.int8)
    b_q.data = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    with pytest.raises(ValueError, match="pack it again"):
        ops.int8_gemm(a_q, b_q, out_dtype=torch.int32, packed=packed)

    layer = Int8Linear.from_float(torch.nn.Linear(32, 16), mode="w8a8")
    x = torch.randn(4, 32)
    layer(x)  # packs
    new = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    layer.weight.data = new  # the old packing must not be used
    want = F.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=0.05, atol=0.05 * float(want.abs().max()))
    with torch.no_grad():
        layer.weight.neg_()  # in place
    want = F.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=0.05, atol=0.05 * float(want.abs().max()))


def _plan(pos_dtype=torch.int64):
    k_pages, v_pages, table, lens, pos, slots, qkv, cos_sin = _decode_step_inputs(2, 4, 2, 16, 4, torch.float32, 3,
                                                                                  pos_dtype)  # fmt: skip
    plan = ops.PagedDecodePlan(k_pages, v_pages, cos_sin, pos, slots, table, lens, 4)
    return plan, (k_pages, v_pages, table, lens, pos, slots, qkv, cos_sin)


@pytest.mark.parametrize("name", ["positions", "slot_mapping", "block_table", "seq_lens"])
def test_decode_plan_refuses_a_resized_buffer(name):
    plan, (k_pages, v_pages, table, lens, pos, slots, qkv, _) = _plan()
    t = {"positions": pos, "slot_mapping": slots, "block_table": table, "seq_lens": lens}[name]
    t.resize_(1 << 16)  # new memory; the planned pointer now points at freed memory
    _churn()
    with pytest.raises(ValueError, match="resized or swapped since the plan was made"):
        plan.run_packed(qkv, k_pages, v_pages)


def test_decode_plan_follows_in_place_writes_to_int32_positions():
    """int32 positions are converted once into a private int64 copy: a later in-place write
    to them must reach the kernels, as it does with int64 positions (used as they are)."""
    outs = []
    for dtype in (torch.int64, torch.int32):
        plan, (k_pages, v_pages, table, lens, pos, slots, qkv, _) = _plan(dtype)
        pos.sub_(1)  # the step's positions, rewritten in place after planning
        outs.append(plan.run_packed(qkv.clone(), k_pages.clone(), v_pages.clone()))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_decode_plan_run_checks_q_against_the_pages():
    plan, (k_pages, v_pages, table, lens, pos, slots, qkv, _) = _plan()
    q = k_pages.view(-1)[: 2 * 4 * 16].view(2, 4, 16)  # q lives inside the k cache
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="q overlaps k_pages"):
        plan.run(q, k, v, k_pages, v_pages)


def test_cpu_graph_keeps_inputs_made_before_capture_alive():
    w = torch.randn(256, 512)
    lin = ops.prepare_linear(w)
    x = torch.randn(1, 512)
    want = lin(x).clone()  # the same kernel, eagerly: a replay over live inputs gives these bits
    with ops.capture_cpu_graph() as g:
        y = lin(x)
    del x, w, lin
    _churn()
    y.zero_()
    g.replay()
    assert torch.equal(y, want)


def test_cpu_graph_refuses_a_buffer_moved_after_capture():
    x = torch.randn(4, 64)
    with ops.capture_cpu_graph() as g:
        ops.rms_norm(x, None)
    x.resize_(1 << 16)  # reallocates x's storage: the recorded pointer would dangle
    _churn()
    with pytest.raises(RuntimeError, match="resized or moved"):
        g.replay()


def test_cpu_graph_captures_large_outputs():
    """New outputs >= 4 MiB get a huge-page hint (_C.advise_hugepages), which only advises:
    the capture runs it and does not refuse."""
    x = torch.randn(2048, 1024)  # 8 MiB output
    with ops.capture_cpu_graph() as g:
        y = ops.rms_norm(x, None)
    want = y.clone()
    y.zero_()
    g.replay()
    assert torch.equal(y, want)


def test_inference_tensors_written_in_place_are_seen_by_value():
    """Inference tensors have no version counter (their writes bumped nothing, so every one of
    these silently kept the old values): small watched tensors are compared by value, and
    Int8Linear drops its pack when a state dict is loaded into it."""
    with torch.inference_mode():
        x = torch.randn(2, 64)
        lin, lin2 = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
        layer = Int8Linear.from_float(lin, mode="w8a8")
        layer(x)  # packed
        layer.load_state_dict(Int8Linear.from_float(lin2, mode="w8a8").state_dict())
        torch.testing.assert_close(layer(x), Int8Linear.from_float(lin2, mode="w8a8")(x), rtol=0, atol=0)

        a = torch.randint(-127, 128, (2, 64), dtype=torch.int8)
        b = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
        packed = ops.pack_int8_weight(b)
        b.zero_()
        with pytest.raises(ValueError, match="written in place since pack_int8_weight"):
            ops.int8_gemm(a, b, out_dtype=torch.int32, packed=packed)

        w, bias = torch.randn(32, 64), torch.randn(32).half()  # an fp16 bias: a private fp32 copy
        prepared = ops.prepare_linear(w, bias)
        prepared(x)
        bias.zero_()
        torch.testing.assert_close(prepared(x), F.linear(x, w), rtol=1e-5, atol=1e-5)

        norm = ops.prepare_rms_norm(torch.randn(128)[::2])  # strided: a private contiguous copy
        norm.add_(torch.randn(2, 64), torch.randn(2, 64))
        norm.weight.mul_(2)
        h, r = torch.randn(2, 64), torch.randn(2, 64)
        want = ops.add_rms_norm_(h.clone(), r.clone(), norm.weight)
        got = norm.add_(h, r)
        assert all(torch.equal(g, w_) for g, w_ in zip(got, want))

        from ringfuse.ops import _common as c

        nan = torch.tensor([float("nan"), 1.0])
        watch = c.Watch((nan,))
        assert not watch.changed()  # compared by bytes: a NaN is no change (every call re-prepared)
        nan[1] = 2.0
        assert watch.changed()

    outs = []
    for dtype in (torch.int64, torch.int32):  # int32 positions: a private int64 copy
        with torch.inference_mode():
            plan, (k_pages, v_pages, table, lens, pos, slots, qkv, _) = _plan(dtype)
            pos.sub_(1)
            outs.append(plan.run_packed(qkv.clone(), k_pages.clone(), v_pages.clone()))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
