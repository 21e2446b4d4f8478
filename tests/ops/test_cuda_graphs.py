"""Every op's CUDA path runs without a host sync (torch.cuda.set_sync_debug_mode("error")
turns any sync into an error) and can be captured in a torch.cuda.CUDAGraph: after the
capture the inputs get new values in place (new tokens, longer sequences, other slots), the
graph replays, and its outputs equal an eager call on the same values, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ringfuse import ops

pytestmark = pytest.mark.gpu

DEV = "cuda"


def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEV).to(dtype)


def new_values(*tensors):
    """Refill float tensors in place with fresh values."""
    for t in tensors:
        t.copy_(torch.randn_like(t, dtype=torch.float32))


def check_capture(run, inputs, refresh):
    """run(inputs) -> the tensors to compare (outputs, or the inputs an in-place op writes).
    Warm-up (compiles), an eager call under sync-error mode, a capture, refresh(inputs),
    replay == eager on clones of the refreshed inputs."""
    run(inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run([t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(inputs)
    refresh(inputs)
    want = run([t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
    graph.replay()
    torch.cuda.synchronize()
    for got, exp in zip(captured, want, strict=True):
        assert torch.equal(got, exp)
    ops.check_device_errors()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_norms(backend):
    saved = ops.cuda_backend()
    try:
        ops.set_cuda_backend(backend)
    except ValueError:
        pytest.skip("ringfuse._C was built without the CUDA C++ kernels (no nvcc)")
    try:
        x, r, w, b = randn(4, 1024), randn(4, 1024), randn(1024), randn(1024)

        def refresh(t):
            new_values(t[0], t[1])

        def add_rms_norm_in_place(t):
            ops.add_rms_norm_(t[0], t[1], t[2])
            return [t[0], t[1]]

        check_capture(lambda t: [ops.rms_norm(t[0], t[2])], [x, r, w], refresh)
        check_capture(lambda t: list(ops.add_rms_norm(t[0], t[1], t[2])), [x, r, w], refresh)
        check_capture(add_rms_norm_in_place, [x, r, w], refresh)
        check_capture(lambda t: [ops.layer_norm(t[0], t[2], t[3])], [x, r, w, b], refresh)
        check_capture(lambda t: list(ops.add_layer_norm(t[0], t[1], t[2], t[3])), [x, r, w, b], refresh)
    finally:
        ops.set_cuda_backend(saved)


def test_gated_activations_and_linear():
    x, w = randn(3, 2 * 512), randn(256, 512)
    check_capture(lambda t: [ops.silu_mul(t[0])], [x], lambda t: new_values(t[0]))
    check_capture(lambda t: [ops.gelu_tanh_mul(t[0])], [x], lambda t: new_values(t[0]))
    check_capture(lambda t: [ops.linear(t[0][:, :512], t[1])], [x, w], lambda t: new_values(t[0]))


def test_rotary_and_write_kv():
    q, k = randn(3, 8, 64), randn(3, 2, 64)
    positions = torch.tensor([0, 5, 9], device=DEV)
    cache = ops.cos_sin_cache(64, 64).to(DEV)

    def rotate(t):
        ops.rotary_embedding(t[0], t[1], t[2], t[3])
        return [t[0], t[1]]

    def refresh_rotary(t):
        new_values(t[0], t[1])
        t[2].copy_(torch.tensor([63, 1, 2], device=DEV))

    check_capture(rotate, [q, k, positions, cache], refresh_rotary)

    k_cache, v_cache = randn(8, 2, 16, 64), randn(8, 2, 16, 64)
    v = randn(3, 2, 64)
    slots = torch.tensor([0, 17, -1], device=DEV)

    def write(t):
        ops.write_kv(t[0], t[1], t[2], t[3], t[4])
        return [t[2], t[3]]

    def refresh_write(t):
        new_values(t[0], t[1])
        t[4].copy_(torch.tensor([127, -1, 33], device=DEV))

    check_capture(write, [k, v, k_cache, v_cache, slots], refresh_write)


@pytest.mark.parametrize("window", [None, 40])
def test_decode_attention(window):
    q = randn(4, 8, 128)
    k_cache, v_cache = randn(4, 2, 256, 128), randn(4, 2, 256, 128)
    lens = torch.tensor([1, 100, 256, 0], dtype=torch.int32, device=DEV)

    def refresh(t):
        new_values(t[0])
        t[3].copy_(torch.tensor([256, 3, 77, 200], dtype=torch.int32, device=DEV))

    check_capture(lambda t: [ops.decode_attention(t[0], t[1], t[2], t[3], window=window)], [q, k_cache, v_cache, lens],
                  refresh)  # fmt: skip
    pages_k, pages_v = randn(40, 2, 16, 128), randn(40, 2, 16, 128)
    table = torch.randperm(40, device=DEV)[:32].view(4, 8).to(torch.int32)
    lens_p = torch.tensor([1, 100, 128, 0], dtype=torch.int32, device=DEV)

    def refresh_paged(t):
        new_values(t[0])
        t[3].copy_(torch.randperm(40, device=DEV)[:32].view(4, 8).to(torch.int32))
        t[4].copy_(torch.tensor([128, 3, 77, 20], dtype=torch.int32, device=DEV))

    check_capture(lambda t: [ops.paged_decode_attention(t[0], t[1], t[2], t[3], t[4], window=window)],
                  [q, pages_k, pages_v, table, lens_p], refresh_paged)  # fmt: skip


def test_decode_plan():
    """PagedDecodePlan on CUDA (rotary, write_kv and paged attention per layer), captured."""
    pages_k, pages_v = randn(16, 2, 16, 64), randn(16, 2, 16, 64)
    cache = ops.cos_sin_cache(256, 64).to(DEV)
    positions = torch.tensor([5, 40], device=DEV)
    slots = torch.tensor([5, 16 * 4 + 8], device=DEV)
    table = torch.arange(16, dtype=torch.int32, device=DEV).view(2, 8)
    lens = torch.tensor([6, 41], dtype=torch.int32, device=DEV)
    qkv = randn(2, (8 + 4) * 64)

    def step(t):
        plan = ops.PagedDecodePlan(t[1], t[2], cache, t[3], t[4], t[5], t[6], 8)
        return [plan.run_packed(t[0], t[1], t[2]), t[1], t[2]]

    def refresh(t):
        new_values(t[0])
        t[3].copy_(torch.tensor([6, 41], device=DEV))
        t[4].copy_(torch.tensor([6, 16 * 4 + 9], device=DEV))
        t[6].copy_(torch.tensor([7, 42], dtype=torch.int32, device=DEV))

    check_capture(step, [qkv, pages_k, pages_v, positions, slots, table, lens], refresh)


@pytest.mark.parametrize("max_seqlen_q", [None, 64])
def test_prefill_attention(max_seqlen_q):
    q, k, v = randn(2, 8, 64, 64), randn(2, 2, 64, 64), randn(2, 2, 64, 64)
    check_capture(lambda t: [ops.attention(t[0], t[1], t[2], causal=True)], [q, k, v],
                  lambda t: new_values(*t))  # fmt: skip
    qp, kp, vp = randn(100, 8, 64), randn(100, 2, 64), randn(100, 2, 64)
    cu = torch.tensor([0, 30, 94, 100], dtype=torch.int32, device=DEV)

    def refresh(t):
        new_values(t[0], t[1], t[2])
        t[3].copy_(torch.tensor([0, 60, 61, 100], dtype=torch.int32, device=DEV))

    check_capture(lambda t: [ops.attention_varlen(t[0], t[1], t[2], t[3], t[3], max_seqlen_q=max_seqlen_q,
                                                  causal=True)], [qp, kp, vp, cu], refresh)  # fmt: skip


def test_int8():
    x, w = randn(16, 512), randn(256, 512, dtype=torch.float32)
    w_q, w_scale = ops.quantize_per_token(w)
    check_capture(lambda t: list(ops.quantize_per_token(t[0])), [x], lambda t: new_values(t[0]))

    def w8a8(t):
        a_q, a_scale = ops.quantize_per_token(t[0])
        return [ops.int8_gemm(a_q, t[1], a_scale, t[2], out_dtype=torch.bfloat16)]

    check_capture(w8a8, [x, w_q, w_scale], lambda t: new_values(t[0]))
    check_capture(lambda t: [ops.int8_weight_only_linear(t[0], t[1], t[2])], [x, w_q, w_scale],
                  lambda t: new_values(t[0]))  # fmt: skip


def test_bad_values_inside_a_graph_are_reported_at_the_check():
    """A replay with out-of-range seq_lens zeroes the row and raises the flag, which the
    next check_device_errors reports (and clears)."""
    q, k_cache, v_cache = randn(2, 8, 64), randn(2, 2, 32, 64), randn(2, 2, 32, 64)
    lens = torch.tensor([3, 32], dtype=torch.int32, device=DEV)
    ops.decode_attention(q, k_cache, v_cache, lens)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, k_cache, v_cache, lens)
    lens.copy_(torch.tensor([3, 33], dtype=torch.int32, device=DEV))
    graph.replay()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    with pytest.raises(ops.DeviceValueError, match="seq_lens"):
        ops.check_device_errors()
    ops.check_device_errors()
