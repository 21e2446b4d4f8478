"""ringfuse.distributed's NCCL transport on 2 GPUs (rank r on cuda:r, "cpu:gloo,cuda:nccl"
control plane): results bitwise equal to the CPU ring (the same inputs through the torch
transport on CPU) and to the fixed-order reference of test_allreduce.py, for every dtype,
odd sizes, unaligned tensors, small and default pieces, a side stream; mismatches, a dead
peer and a peer that never enters the ring. Marked gpu: skipped without 2 CUDA devices.
The same code's no-GPU checks (ABI, schedule simulator, kernels, loader) are in
test_nccl_build.py.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from ringfuse import _C

from . import workers, workers_nccl
from .harness import run_ranks, values
from .test_allreduce import even_bounds, reference_all_reduce


def _nccl_loadable() -> bool:
    if not hasattr(_C, "nccl_ring_run"):
        return False
    from ringfuse.distributed.allreduce import nccl_library_path

    path = nccl_library_path()
    if os.path.isabs(path):
        return True
    try:
        ctypes.CDLL(path)
    except OSError:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
    pytest.mark.skipif(not hasattr(_C, "nccl_ring_run"), reason="ringfuse._C was built without CUDA"),
    pytest.mark.skipif(not _nccl_loadable(), reason="libnccl.so.2 not found (pip install 'ringfuse[cuda]')"),
]

WORLD = 2


def cases():
    """(kind, numel, dtype, op, seed, offset in elements, backend)."""
    out = []
    for dtype in ("float32", "bfloat16", "float16", "int32", "int64"):
        for numel in (1, 7, 1_000_003):
            out.append(("all_reduce", numel, dtype, "sum", numel % 97, 0, "nccl"))
    for op in ("avg", "max", "min"):
        out.append(("all_reduce", 77, "float32", op, 3, 0, "nccl"))
        out.append(("all_reduce", 1_000_003, "bfloat16", op, 4, 0, "nccl"))
        out.append(("all_reduce", 1_000_003, "float16", op, 5, 0, "auto"))
    out.append(("all_reduce", 1_000_003, "bfloat16", "sum", 11, 3, "auto"))  # data 6 bytes past alignment
    out.append(("all_reduce", 4097, "float32", "avg", 12, 1, "nccl"))
    out.append(("all_reduce", 333, "int64", "max", 13, 1, "nccl"))
    out.append(("reduce_scatter", 12 * WORLD, "float32", "sum", 7, 0, "nccl"))
    out.append(("reduce_scatter", 4 * WORLD, "int64", "max", 8, 0, "nccl"))
    out.append(("reduce_scatter", 1_000_002, "bfloat16", "avg", 14, 1, "auto"))
    out.append(("all_gather", 5, "bfloat16", "sum", 9, 0, "nccl"))
    out.append(("all_gather", 1, "int32", "sum", 10, 0, "nccl"))
    out.append(("all_gather", 500_001, "float32", "sum", 15, 3, "auto"))
    # the torch transport on CUDA tensors (NCCL send/recv of torch's group) agrees as well
    out.append(("all_reduce", 1_000_003, "bfloat16", "avg", 16, 0, "torch"))
    out.append(("all_reduce", 77, "float32", "avg", 17, 1, "torch"))
    out.append(("reduce_scatter", 4 * WORLD, "int64", "min", 18, 0, "torch"))
    return out


def check_against_cpu(results, cs):
    for r in range(WORLD):
        assert results[r][-1] == ("nccl", "nccl"), results[r][-1]  # auto's choice for CUDA tensors
    for i, (kind, numel, dtype, op, seed, offset, backend) in enumerate(cs):
        inputs = [workers.rank_input(r, numel, getattr(torch, dtype), seed) for r in range(WORLD)]
        if kind == "all_reduce":
            expected = [reference_all_reduce(inputs, op, even_bounds(numel, WORLD))] * WORLD
        elif kind == "reduce_scatter":
            n = numel // WORLD
            full = reference_all_reduce(inputs, op, [(c * n, (c + 1) * n) for c in range(WORLD)])
            expected = [full[r * n : (r + 1) * n] for r in range(WORLD)]
        else:
            expected = [torch.cat(inputs)] * WORLD
        for r in range(WORLD):
            got, cpu = results[r][i]
            what = (kind, numel, dtype, op, offset, backend, f"rank {r}")
            assert got.dtype == cpu.dtype and torch.equal(got, cpu), what + ("differs from the CPU ring",)
            assert torch.equal(got, expected[r]), what + ("differs from the fixed-order reference",)


@pytest.mark.parametrize("piece_bytes", [None, 4096, 1 << 16], ids=["default pieces", "4 KiB pieces", "64 KiB pieces"])
def test_nccl_matches_the_cpu_ring_bitwise(piece_bytes):
    cs = cases()
    check_against_cpu(values(run_ranks(workers_nccl.nccl_vs_cpu, WORLD, cs, piece_bytes, use_cuda=True,
                                       timeout_s=600)), cs)  # fmt: skip


def test_nccl_on_a_side_stream():
    cs = [c for c in cases() if c[1] >= 4097]
    check_against_cpu(values(run_ranks(workers_nccl.nccl_vs_cpu, WORLD, cs, 1 << 16, True, use_cuda=True,
                                       timeout_s=600)), cs)  # fmt: skip


def test_nccl_many_small_calls():
    assert values(run_ranks(workers_nccl.many_small_calls, WORLD, 300, use_cuda=True)) == [300, 300]


@pytest.mark.parametrize("what", ["numel", "dtype", "op"])
def test_nccl_mismatched_calls_are_refused_before_data_moves(what):
    for kind, message, untouched, after in values(run_ranks(workers_nccl.mismatched, WORLD, what, use_cuda=True)):
        assert kind == "RingMismatchError" and untouched
        assert "rank 0" in message and "rank 1" in message
        assert torch.equal(after, torch.full((5,), 3.0))


def test_nccl_dead_peer_raises_ring_timeout_error_within_the_timeout():
    timeout_s = 3.0
    res = run_ranks(workers_nccl.dead_peer, WORLD, timeout_s, allow_missing=(WORLD - 1,), use_cuda=True, timeout_s=120)
    status, value = res[0]
    assert status == "ok", value
    kind, elapsed, message = value
    assert kind == "RingTimeoutError", value
    assert elapsed < timeout_s + 5, elapsed
    assert "rank 0" in message


def test_nccl_ring_times_out_and_aborts_when_a_peer_never_enters_it():
    timeout_ms = 2000
    res = values(run_ranks(workers_nccl.peer_never_calls, WORLD, timeout_ms, use_cuda=True, timeout_s=120))
    status, elapsed, message, again, broken_message = res[0]
    assert status == 1, message
    assert timeout_ms / 1000 <= elapsed < timeout_ms / 1000 + 5, elapsed
    assert "did not complete within 2000 ms" in message and "rank 0" in message and "aborted" in message, message
    assert again == 4 and broken_message.startswith("communicator is broken by an earlier failure"), broken_message
