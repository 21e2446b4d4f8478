"""All-reduce bench in the style of nccl-tests, ringfuse's ring vs torch.distributed's gloo
in the same run: N processes on this host (a gloo group as the control plane), fp32 sum,
sizes 4 B .. 64 MiB. Per size: time per call (median of interleaved rounds, each round a
block of calls between barriers, rank 0's clock), algbw = bytes / time and busbw = algbw *
2 (N - 1) / N (the bytes each rank's link carries in a ring, which makes different N
comparable), and the ratio gloo time / ringfuse time.
"""

from __future__ import annotations

import statistics
import time

import torch

from .harness import fmt_us, print_table, run_ranks
from .limits import cpu_path

SIZES = [4 << (2 * i) for i in range(13)]  # 4 B, 16 B, ..., 64 MiB (x4 steps)
QUICK_SIZES = [4, 4096, 1 << 20, 16 << 20]


def _calls(nbytes: int) -> int:
    """Calls per timed block: ~tens of ms of gloo per block, at least 2."""
    return max(2, min(500, (8 << 20) // max(nbytes, 16 << 10)))


def _time_block(fn, calls: int, barrier) -> float:
    barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _rank_body(rank, world, sizes, rounds):
    import torch.distributed as dist

    from .. import distributed as rdist

    rows = []
    backend = rdist.backend_for(None)
    for nbytes in sizes:
        x = torch.ones(max(1, nbytes // 4))  # fp32
        calls = _calls(nbytes)
        ours = lambda: rdist.all_reduce(x)  # noqa: E731
        gloo = lambda: dist.all_reduce(x)  # noqa: E731
        ours(), gloo()  # warm up (and build the communicator)
        t_ours, t_gloo = [], []
        for _ in range(rounds):
            t_ours.append(_time_block(ours, calls, dist.barrier))
            t_gloo.append(_time_block(gloo, calls, dist.barrier))
        rows.append((x.numel() * 4, statistics.median(t_gloo), statistics.median(t_ours)))
    return backend, rows


MAX_NPROC = 64  # the shared-memory ring's largest group


def check_nproc(nproc: int) -> None:
    """ValueError unless ``nproc`` makes a ring: 2 processes at least (one rank has nothing
    to compare against gloo), at most the shm ring's 64."""
    if not 2 <= nproc <= MAX_NPROC:
        raise ValueError(f"bench allreduce: --nproc must be in [2, {MAX_NPROC}] (processes in the ring), got {nproc}")


def run(nproc: int = 2, sizes=SIZES, rounds: int = 5):
    check_nproc(nproc)
    backend, rows = run_ranks(_rank_body, nproc, list(sizes), rounds)
    bus = 2 * (nproc - 1) / nproc
    table, results = [], []
    for nbytes, t_gloo, t_ours in rows:
        alg_g, alg_o = nbytes / t_gloo / 1e9, nbytes / t_ours / 1e9
        results.append(dict(bytes=nbytes, gloo_s=t_gloo, ringfuse_s=t_ours, speedup=t_gloo / t_ours,
                            busbw_gloo=alg_g * bus, busbw_ringfuse=alg_o * bus))  # fmt: skip
        table.append([_fmt_bytes(nbytes), fmt_us(t_gloo), fmt_us(t_ours), f"{alg_g * bus:.3f}", f"{alg_o:.3f}",
                      f"{alg_o * bus:.3f}", f"{t_gloo / t_ours:.1f}x"])  # fmt: skip
    print_table(f"all_reduce fp32 sum, {nproc} processes on this host: ringfuse ({backend} ring, cpu path "
                f"{cpu_path()}) vs gloo",
                ["size", "gloo us", "ringfuse us", "gloo busbw GB/s", "algbw GB/s", "busbw GB/s", "speedup"],
                table, left=1,
                note="time per call, Python call included, median of interleaved rounds (rank 0's clock); "
                     f"busbw = algbw * 2(n-1)/n = algbw * {bus:.2f}.")  # fmt: skip
    return results


def _fmt_bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n // size} {unit}"
    return f"{n} B"
