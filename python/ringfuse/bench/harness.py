"""Timing harness shared by every ringfuse bench.

These machines are small, shared VMs whose speed drifts by 2x between minutes, so a bench
never reports an absolute time alone: each case times ringfuse and its baseline in the same
run, interleaved round by round, and reports medians and their ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Timing:
    median_s: float
    rounds: list[float] = field(default_factory=list)


def _calls_per_block(fn: Callable[[], object], target_s: float) -> int:
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(100_000, int(target_s / one)))


def compare(fns: dict[str, Callable[[], object]], rounds: int = 7, block_s: float = 0.02,
            warmup: int = 2) -> dict[str, Timing]:
    """Time each callable in ``fns``, interleaved: every round runs a block of calls of each
    one in turn, so drift hits all of them alike. Returns per-call median times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {name: _calls_per_block(fn, block_s) for name, fn in fns.items()}
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            per_call[name].append((time.perf_counter() - t0) / n)
    return {name: Timing(statistics.median(ts), ts) for name, ts in per_call.items()}


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f}" if us < 1000 else f"{us:,.0f}"


def print_table(title: str, columns: list[str], rows: list[list[str]], note: str | None = None,
                left: int = 3) -> None:
    """Print a table with rich; the first ``left`` columns are labels (left-justified), the
    rest numbers (right-justified)."""
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i < left else "right")
        for row in rows:
            table.add_row(*row)
        console = Console(width=max(100, sum(len(c) + 3 for c in columns) + 20))
        console.print(table)
        if note:
            console.print(note)
    except ImportError:  # rich is a dependency; keep the numbers printable anyway
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(row))
        if note:
            print(note)


def _rank_entry(body, rank: int, world: int, port: int, args, queue) -> None:
    """One rank of a multi-process bench: joins a gloo group on loopback with one thread,
    runs ``body(rank, world, *args)``; rank 0's result (or any rank's exception) goes back
    to the parent through ``queue``."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from .. import distributed as rd

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
        result = body(rank, world, *args)
        if rank == 0:
            queue.put(("ok", result))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        queue.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))
    finally:
        rd.destroy()
        queue.close()
        queue.join_thread()  # the result is in the pipe before the process goes
        os._exit(0)  # skip gloo's teardown


def run_ranks(body, nproc: int, *args, timeout_s: float = 1800):
    """Run ``body`` (a module-level function) on ``nproc`` spawned ranks; rank 0's result.
    Never waits on ranks that are gone: a rank that dies without a result (a signal, a crash)
    or rank 0 exiting without one ends the wait at once, and ``timeout_s`` bounds the rest."""
    import multiprocessing as mp
    import queue as queue_mod
    import socket

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"run_ranks: nproc must be >= 1, got {nproc!r}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_entry, args=(body, r, nproc, port, args, queue)) for r in range(nproc)]
    deadline, got, killed = time.monotonic() + timeout_s, None, []
    try:
        for p in procs:
            p.start()
        while True:
            try:
                got = queue.get(timeout=0.2)
                break
            except queue_mod.Empty:
                pass
            # every rank puts its result or error before exiting 0 (rank 0 always, the others on
            # an error), so a nonzero exit code, or rank 0 gone, means none is coming (after
            # one last look: rank 0's put may still be in the pipe)
            gone = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if gone or procs[0].exitcode is not None:
                try:
                    got = queue.get(timeout=1.0)
                    break
                except queue_mod.Empty:
                    r, code = gone[0] if gone else (0, 0)
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    raise RuntimeError(f"{body.__module__}.{body.__name__}: rank {r} exited ({how}) without a result")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{body.__module__}.{body.__name__}: no result within {timeout_s:g} s")
        # an error from a rank whose peer was killed (its store connection reset) is a
        # consequence: the kill, seen here before the others are stopped, is the cause
        killed = [(r, p.exitcode) for r, p in enumerate(procs) if (p.exitcode or 0) < 0]
    finally:
        for p in procs:  # a finished run: let them exit; a failed one: stop them now
            if got is not None and got[0] == "ok" and p.pid is not None:
                p.join(timeout=30)
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join(timeout=5)
    status, payload = got
    if status != "ok":
        if killed:
            r, code = killed[0]
            payload = f"rank {r} exited (signal {-code}) without a result; then {payload}"
        raise RuntimeError(f"{body.__module__}.{body.__name__}: {payload}")
    return payload
