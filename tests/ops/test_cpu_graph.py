"""ops.capture_cpu_graph: replaying the recorded kernels equals running the ops again on the
captured buffers; torch compute and value-returning kernels are refused; the ops' kernel
module is restored whatever happens; buffers made during capture outlive their names."""

import gc

import pytest
import torch

from ringfuse import _C, ops
from ringfuse.ops import native


def test_replay_equals_eager_on_new_inputs():
    g0 = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 40, generator=g0), torch.randn(48, generator=g0)
    lin, norm = ops.prepare_linear(w, b), ops.prepare_rms_norm(torch.rand(48, generator=g0) + 0.5, 1e-5)
    x, res = torch.randn(2, 40, generator=g0), torch.randn(2, 48, generator=g0)
    with ops.capture_cpu_graph() as g:
        h = lin(x)
        y, r = norm.add_(h, res)
        out = ops.silu_mul(y)
    assert len(g.calls) == 3
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(2, 40, generator=gen))
        res.copy_(torch.randn(2, 48, generator=gen))
        r0 = res.clone()
        g.replay()
        want_h = ops.linear(x, w, b)
        want_y, want_r = ops.add_rms_norm_(want_h, r0, norm.weight, 1e-5)
        assert torch.equal(out, ops.silu_mul(want_y)) and torch.equal(res, want_r)


def test_refuses_what_a_replay_would_not_repeat():
    x = torch.randn(4, 8)
    with pytest.raises(ops.NotCapturable, match="torch function add ran during capture"):
        with ops.capture_cpu_graph():
            ops.silu_mul(x + 1)
    w_q = torch.zeros(16, 8, dtype=torch.int8)
    with pytest.raises(ops.NotCapturable, match="int8_pack_b returned a value"):  # has_min: value-dependent
        with ops.capture_cpu_graph():
            ops.pack_int8_weight(w_q)
    with pytest.raises(ops.NotCapturable, match="item ran during capture"):
        with ops.capture_cpu_graph():
            x[0, 0].item()  # reading a value: a data-dependent decision
    with pytest.raises(ops.NotCapturable, match="contiguous copied its input"):
        with ops.capture_cpu_graph():
            ops.silu_mul(x.T.contiguous())
    row = torch.tensor(1)
    with pytest.raises(ops.NotCapturable, match="indexing with a tensor"):
        with ops.capture_cpu_graph():
            ops.silu_mul(x[row])  # a row picked by a value
    with pytest.raises(ops.NotCapturable, match="non-CPU tensor"):
        with ops.capture_cpu_graph():
            torch.empty(2, 4, device="meta").view(8)
    isa = _C.isa()
    with pytest.raises(ops.NotCapturable, match="set_isa changes the process-wide ISA"):
        with ops.capture_cpu_graph():
            _C.set_isa("scalar")  # a replay would switch it again
    assert _C.isa() == isa
    with pytest.raises(ops.NotCapturable, match="already in progress"):
        with ops.capture_cpu_graph():
            with ops.capture_cpu_graph():
                pass
    assert not getattr(_C.linear, "_ringfuse_recording", False)  # the real kernels are back after each failure
    assert native._C is _C  # the wrappers' module: _C itself, its functions looked up at each call


def test_buffers_made_during_capture_stay_alive():
    w = torch.randn(64, 32)
    lin = ops.prepare_linear(w)
    x = torch.randn(1, 32)
    with ops.capture_cpu_graph() as g:
        kept = ops.silu_mul(lin(x))  # lin's output has no name left after this line
    ptr = kept.data_ptr()
    del kept
    gc.collect()
    junk = [torch.randn(1, 64) for _ in range(64)]  # would reuse freed memory
    g.replay()
    out = next(t for t in g._keep if t.data_ptr() == ptr)
    assert torch.equal(out, ops.silu_mul(ops.linear(x, w))) and junk


def test_other_threads_are_not_recorded():
    import threading

    w = torch.randn(16, 8)
    lin = ops.prepare_linear(w)
    x, other = torch.randn(1, 8), torch.randn(1, 8)
    done = threading.Event()
    with ops.capture_cpu_graph() as g:
        y = lin(x)
        t = threading.Thread(target=lambda: (ops.silu_mul(lin(other)), done.set()))
        t.start()
        t.join()
    assert done.is_set() and len(g.calls) == 1 and torch.equal(y, ops.linear(x, w))


def test_buffers_made_during_capture_share_a_few_arena_storages():
    """Replay re-checks the address of every storage the graph touches, so the block's own
    buffers come from 1 MiB arena chunks (64-byte aligned), not one storage each; a large one
    keeps its own storage."""
    w = torch.randn(64, 64)
    lin = ops.prepare_linear(w)
    x = torch.randn(2, 64)
    with ops.capture_cpu_graph() as g:
        h = x
        for _ in range(20):
            h = ops.rms_norm(lin(h), None)
        big = ops.rms_norm(torch.empty(1024, 128), None)  # 512 KiB: its own storage
    assert len(g.calls) == 41
    storages = {t.untyped_storage().data_ptr() for t in g._keep if t.numel()}
    assert len(storages) == 3  # one chunk, big's input, big
    assert all(t.data_ptr() % 64 == 0 for t in g._keep if t.numel())
    want = h.clone()
    h.zero_()
    g.replay()
    assert torch.equal(h, want) and big.untyped_storage().nbytes() == 1024 * 128 * 4


def test_an_output_resized_past_its_chunk_is_refused():
    x = torch.randn(4, 64)
    with ops.capture_cpu_graph() as g:
        y = ops.rms_norm(x, None)
    y.resize_(1 << 20)  # grows the arena chunk it lives in: a new address
    with pytest.raises(RuntimeError, match="resized or moved"):
        g.replay()


def test_static_tensors_are_held_and_not_rechecked():
    """static: tensors the caller promises not to resize (a model's weights): held alive, left
    out of the per-replay address check."""
    w = torch.randn(32, 48)
    lin = ops.prepare_linear(w)
    x = torch.randn(1, 48)
    want = ops.linear(x, w)
    with ops.capture_cpu_graph(static=[w]) as g:
        y = lin(x)
    assert w.untyped_storage().data_ptr() not in g._storages and x.untyped_storage().data_ptr() in g._storages
    del w, lin
    gc.collect()
    junk = [torch.randn(32, 48) for _ in range(64)]
    y.zero_()
    g.replay()
    assert torch.equal(y, want) and junk
    with pytest.raises(TypeError, match="static must be an iterable of tensors, got a list"):
        with ops.capture_cpu_graph(static=[[x]]):
            pass


def test_a_rebound_input_keeps_the_captured_memory():
    """As with CUDA graphs, rebinding a captured tensor (set_, .data =) is not seen: the replay
    reads the memory it captured (the graph holds it), so new inputs go in with copy_."""
    x = torch.randn(4, 16)
    old = x.clone()
    with ops.capture_cpu_graph() as g:
        y = ops.silu_mul(x)
    x.data = torch.randn(4, 16)  # x now points elsewhere; the graph still reads the old buffer
    g.replay()
    assert torch.equal(y, ops.silu_mul(old))
