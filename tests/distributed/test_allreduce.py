"""ringfuse.distributed: the ring collectives on 2, 3 and 4 CPU processes (gloo control
plane), every transport, against a fixed-order reference computed here.

The reference follows the ring's documented order: chunk c starts from rank c+1's values
and folds in ranks c+2, ..., c (mod N), each step ``(received, local)`` in fp32 for fp16 /
bf16 and rounded back to the dtype; avg divides the final sum once. Integers: exact sums.
"""

from __future__ import annotations

import glob

import pytest
import torch

from ringfuse import _C
from ringfuse import distributed as rdist

from . import workers
from .harness import run_ranks, values

BACKENDS = ["torch"] + (["shm"] if hasattr(_C, "shm_ring_open") else [])


def shm_segments():
    return set(glob.glob("/dev/shm/ringfuse-*"))


@pytest.fixture(autouse=True)
def no_segment_left_behind():
    before = shm_segments()
    yield
    assert shm_segments() <= before, "a ringfuse shared-memory segment outlived its processes"


def _step(op, a, b):
    af, bf = (a.float(), b.float()) if a.dtype in (torch.float16, torch.bfloat16) else (a, b)
    r = {"sum": torch.add, "avg": torch.add, "max": torch.maximum, "min": torch.minimum}[op](af, bf)
    return r.to(a.dtype)


def reference_all_reduce(inputs, op, bounds):
    n = len(inputs)
    out = torch.empty_like(inputs[0])
    for c, (b, e) in enumerate(bounds):
        acc = inputs[(c + 1) % n][b:e].clone()
        for j in range(2, n + 1):
            acc = _step(op, acc, inputs[(c + j) % n][b:e])
        if op == "avg":
            acc = (acc.float() / n).to(acc.dtype) if acc.dtype in (torch.float16, torch.bfloat16) else acc / n
        out[b:e] = acc
    return out


def even_bounds(numel, n):
    base, extra = divmod(numel, n)
    out, start = [], 0
    for c in range(n):
        size = base + (c < extra)
        out.append((start, start + size))
        start += size
    return out


def cases_for(world):
    cases = []
    for dtype in ("float32", "bfloat16", "float16", "int32", "int64"):
        for numel in (1, 7, world - 1 or 1, 1000):
            cases.append(("all_reduce", numel, dtype, "sum", numel))
    for op in ("avg", "max", "min"):
        cases.append(("all_reduce", 77, "float32", op, 3))
        cases.append(("all_reduce", 77, "bfloat16", op, 4))
    cases.append(("all_reduce", 1_000_003, "float32", "sum", 5))
    cases.append(("all_reduce", 300_001, "bfloat16", "sum", 6))
    cases.append(("reduce_scatter", 12 * world, "float32", "sum", 7))
    cases.append(("reduce_scatter", 4 * world, "int64", "max", 8))
    cases.append(("all_gather", 5, "bfloat16", "sum", 9))
    cases.append(("all_gather", 1, "int32", "sum", 10))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_collectives_match_the_fixed_order_reference_on_every_rank(backend, world):
    cases = cases_for(world)
    results = values(run_ranks(workers.collectives, world, backend, cases))
    for r in range(world):
        assert results[r][-1] == backend
    for i, (kind, numel, dtype, op, seed) in enumerate(cases):
        inputs = [workers.rank_input(r, numel, getattr(torch, dtype), seed) for r in range(world)]
        if kind == "all_reduce":
            expected = [reference_all_reduce(inputs, op, even_bounds(numel, world))] * world
        elif kind == "reduce_scatter":
            n = numel // world
            full = reference_all_reduce(inputs, op, [(c * n, (c + 1) * n) for c in range(world)])
            expected = [full[r * n : (r + 1) * n] for r in range(world)]
        else:
            expected = [torch.cat(inputs)] * world
        for r in range(world):
            got = results[r][i]
            assert got.dtype == expected[r].dtype and torch.equal(got, expected[r]), (kind, numel, dtype, op, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_groups_used_alternately(backend):
    res = values(run_ranks(workers.two_groups, 3, backend))
    for r, got in enumerate(res):
        steps = [i for i in range(6) if i % 2 == 0 or r in (0, 1)]
        for t, i in zip(got, steps):
            members = range(3) if i % 2 == 0 else (0, 1)
            assert torch.equal(t, torch.full((5,), float(sum(m + 1 + i for m in members))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_default_group_made_again_gets_its_own_communicator(backend):
    """The cached communicator outlived destroy_process_group(): with the ranks swapped in the
    new group, all_gather put each process at its old rank and reduce_scatter returned the
    old rank's chunk (and a broken one kept refusing the new group)."""
    from .harness import free_port

    res = values(run_ranks(workers.default_group_made_again, 2, backend, free_port()))
    for r, gathered, scattered in res:
        assert torch.equal(gathered, torch.tensor([0.0, 1.0]))
        full = torch.arange(4, dtype=torch.float32) * 3  # ranks' inputs arange * (r + 1), summed
        assert torch.equal(scattered, full[2 * r : 2 * r + 2]), (r, scattered)


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_and_world_are_one_group(backend):
    """group=None and dist.group.WORLD had two communicators over the same store keys (a
    late rank read a segment name already unlinked), and set_timeout(None) did not reach
    WORLD's (ringfuse serve --tp-timeout never reached the model's collectives)."""
    for same, timeout_s, x in values(run_ranks(workers.none_and_world_share_a_communicator, 2, backend, 7.5)):
        assert same and timeout_s == 7.5 and torch.equal(x, torch.full((3,), 3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_thousand_small_calls(backend):
    assert values(run_ranks(workers.many_small_calls, 2, backend, 1000)) == [1000, 1000]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["exit", "sigkill", "exception"])
def test_dead_peer_raises_ring_timeout_error_within_the_timeout(backend, how):
    """The last rank exits, is SIGKILLed or raises instead of calling: the others raise
    RingTimeoutError within the timeout, and (the autouse fixture) no segment is left."""
    timeout_s = 3.0
    res = run_ranks(workers.dead_peer, 3, backend, timeout_s, how, allow_missing=(2,), timeout_s=60)
    for rank in (0, 1):
        status, value = res[rank]
        assert status == "ok", value
        kind, elapsed, message = value
        assert kind == "RingTimeoutError", (rank, value)
        assert elapsed < timeout_s + 5, elapsed
        assert "rank" in message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["numel", "dtype", "op"])
def test_mismatched_calls_are_refused_before_data_moves(backend, what):
    for kind, message, untouched in values(run_ranks(workers.mismatched, 2, backend, what)):
        assert kind == "RingMismatchError" and untouched
        assert "rank 0" in message and "rank 1" in message


@pytest.mark.skipif("shm" not in BACKENDS, reason="no shared-memory transport")
def test_creator_killed_before_publishing_the_name_leaves_no_segment(monkeypatch):
    """Rank 0 (also the store's host) is SIGKILLed right after creating its segment, before
    any peer could learn its name: the peer raises RingTimeoutError (not torch's store
    error), and the next communicator created on this host removes the dead rank's segment."""
    before = shm_segments()
    monkeypatch.setenv("RINGFUSE_TEST_SHM_DIE", "created")
    res = run_ranks(workers.creator_dies, 2, "shm", 10.0, False, allow_missing=(0,), timeout_s=60)
    monkeypatch.delenv("RINGFUSE_TEST_SHM_DIE")
    status, (kind, elapsed, message) = res[1]
    assert status == "ok" and kind == "RingTimeoutError", (kind, message)
    assert elapsed < 10.0 + 5 and "rank 1" in message, (elapsed, message)
    leftovers = shm_segments() - before
    values(run_ranks(workers.collectives, 2, "shm", [("all_reduce", 4, "float32", "sum", 0)]))
    assert not leftovers & shm_segments(), "the dead creator's segment was not removed by the next creation"


@pytest.mark.skipif("shm" not in BACKENDS, reason="no shared-memory transport")
def test_creator_killed_before_peers_attach_survivor_unlinks_the_segment(monkeypatch):
    """The ring of ranks {1, 2} (the store lives on rank 0, which stays up): its creator is
    SIGKILLed after publishing the segment's name. The survivor sees the creator's pid gone
    (well before the timeout), unlinks the segment itself and raises RingTimeoutError."""
    before = shm_segments()
    monkeypatch.setenv("RINGFUSE_TEST_SHM_DIE", "published")
    res = run_ranks(workers.creator_dies, 3, "shm", 20.0, True, allow_missing=(1,), timeout_s=60)
    status, (kind, elapsed, message) = res[2]
    assert status == "ok" and kind == "RingTimeoutError", (kind, message)
    assert elapsed < 10 and "died" in message, (elapsed, message)
    assert shm_segments() <= before, "the dead creator's segment is still in /dev/shm"


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("silent", [0, 1])
def test_peer_that_never_makes_the_first_call_gives_ring_timeout_error(backend, silent):
    """Before any communicator exists (the store-based set-up), a silent peer gives the
    documented RingTimeoutError within the timeout, not torch's DistStoreError."""
    timeout_s = 2.0
    res = values(run_ranks(workers.silent_first_call, 2, backend, timeout_s, silent, timeout_s=60))
    kind, elapsed, message = res[1 - silent]
    assert kind == "RingTimeoutError", (kind, message)
    assert elapsed < timeout_s + 3, elapsed


@pytest.mark.parametrize("backend", BACKENDS)
def test_communicator_still_works_after_a_mismatch(backend):
    """A mismatch is found before any data moves, so the next matching call just runs."""
    for first, second, y in values(run_ranks(workers.mismatch_then_valid, 2, backend)):
        assert first[0] == "RingMismatchError", first
        assert second[0] == "ok", second
        assert torch.equal(y, torch.full((5,), 3.0))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), 0, -1.0, 1e-9, 0.09, 86400.5, 1e300])
def test_set_timeout_refuses_values_out_of_range(bad):
    with pytest.raises(ValueError, match=r"set_timeout: seconds must be .*\[0.1, 86400\]"):
        rdist.set_timeout(bad)


@pytest.mark.parametrize("bad", ["10", None, True, [1.0], torch.tensor(1.0)])
def test_set_timeout_refuses_non_numbers(bad):
    with pytest.raises(TypeError, match="set_timeout: seconds must be a number"):
        rdist.set_timeout(bad)


def test_set_timeout_accepts_the_documented_range():
    import numpy as np

    group = object()  # a key of its own: the default group's timeout stays untouched
    for ok in (0.1, 1, 60.0, 86400, np.float64(2.5)):
        rdist.set_timeout(ok, group)
    with pytest.raises(ValueError, match=r"init: timeout_s must be .*\[0.1, 86400\]"):
        rdist.init(timeout_s=float("inf"))


def test_ddp_comm_hook_matches_torch_default_hook():
    """20 SGD steps on 2 ranks: the ring's average equals gloo's (for two ranks both are
    (a + b) / 2 up to an exact power-of-two scaling), so the losses are bitwise equal."""
    ours = values(run_ranks(workers.ddp_losses, 2, True, 20))
    theirs = values(run_ranks(workers.ddp_losses, 2, False, 20))
    for a, b in zip(ours, theirs):
        assert a.shape == (20,) and torch.equal(a, b)


def test_bad_inputs_are_refused_before_any_communication():
    x = torch.ones(4, 4)
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        rdist.all_reduce([1, 2])
    with pytest.raises(TypeError, match="dtype must be one of"):
        rdist.all_reduce(x.double())
    with pytest.raises(ValueError, match="tensor must be contiguous"):
        rdist.all_reduce(x.t())
    with pytest.raises(ValueError, match="op must be one of"):
        rdist.all_reduce(x, "prod")
    with pytest.raises(ValueError, match="op 'avg' needs a float dtype"):
        rdist.all_reduce(x.int(), "avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        rdist.all_reduce(x, backend="mpi")
    with pytest.raises(ValueError, match="tensor must be on CPU"):
        rdist.all_reduce(torch.ones(2, device="meta"))
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        rdist.all_reduce(x)
    with pytest.raises(ValueError, match="seconds must be"):
        rdist.set_timeout(0)


def test_init_explains_what_is_missing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set; start the program with torchrun"):
        rdist.init()
