"""`ringfuse bench allreduce|tp`: --nproc is checked before anything starts, and the
multi-process bench harness never waits forever on ranks that are gone."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import time

import pytest

from ringfuse.bench import allreduce, tp
from ringfuse.bench.harness import run_ranks

from . import workers


@pytest.mark.parametrize("op,nproc", [("allreduce", 1), ("allreduce", 0), ("tp", 0), ("tp", 1), ("tp", -2), ("tp", 5)])
def test_bad_nproc_is_a_flag_error(op, nproc):
    """Exit code 2 and a message naming --nproc, as for other bad flags (was: a traceback for
    allreduce --nproc 1, a 30-minute wait for tp --nproc 0)."""
    done = subprocess.run([sys.executable, "-m", "ringfuse", "bench", op, "--nproc", str(nproc), "--quick",
                           "--rounds", "1"], capture_output=True, text=True, timeout=90)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--nproc" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_nproc_ranges():
    allreduce.check_nproc(2)
    allreduce.check_nproc(64)
    for bad in (1, 65):
        with pytest.raises(ValueError, match="--nproc must be in"):
            allreduce.check_nproc(bad)
    # quick: 12 / 4 heads split by whole GQA groups up to tp = 4 (3: groups of 1 + 1 + 2 KV
    # heads), replicated KV heads at 12; full: also Llama-2-7B's FFN of 11008 = 2^8 * 43
    assert tp.valid_nproc(quick=True) == [2, 3, 4, 12] and tp.valid_nproc(quick=False) == [2, 4]
    with pytest.raises(ValueError, match=r"--nproc 3 does not fit .* valid: 2, 4"):
        tp.check_nproc(3, quick=False)


def test_harness_refuses_no_ranks():
    with pytest.raises(ValueError, match="nproc must be >= 1"):
        run_ranks(workers.bench_body_dies, 0, timeout_s=5)


def test_harness_reports_ranks_that_die_without_a_result():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank \d exited \(signal 9\) without a result"):
        run_ranks(workers.bench_body_dies, 2, timeout_s=30)
    assert time.monotonic() - t0 < 20
    assert not mp.active_children()


def test_harness_names_the_killed_rank_before_the_errors_it_caused():
    """A rank that fails because its peer was killed (CI saw "rank 1: DistNetworkError:
    Connection reset by peer" alone) is reported after the kill, its cause."""
    with pytest.raises(RuntimeError, match=r"rank 0 exited \(signal 9\) without a result; then rank 1: "
                                           r"RuntimeError: lost rank 0"):  # fmt: skip
        run_ranks(workers.bench_body_rank0_dies_then_rank1_fails, 2, timeout_s=30)
    assert not mp.active_children()
