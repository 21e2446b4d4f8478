"""The CPU shared-memory ring transport (csrc/cpu/allreduce.cpp) through ringfuse._C directly.

Groups of 2, 3 and 4 processes (multiprocessing spawn, no torch.distributed): rank 0 creates
the segment, the others attach (retrying while it does not exist yet), every rank waits on a
barrier, then rank 0 unlinks it, as the Python layer does. The schedule's reduction order is
part of the contract: chunk c is reduced as ((x_{c+1} op x_{c+2}) op ...) op x_c, each step in
the tensor's dtype (fp16/bf16 combined in fp32 and rounded), so results are compared bitwise
with a reference that folds in that order, and across ranks by digest.
"""

import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
import uuid

import pytest
import torch

SLOT_BYTES = 1 << 20
KIND = {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 2}
OP = {"sum": 0, "avg": 1, "max": 2, "min": 3}
DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 4, torch.int64: 5}
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BIG = 1_000_003


# ---------------------------------------------------------------------------------------
# Helpers shared by the parent and the workers


def _open(C, name, rank, world):
    if rank == 0:
        return C.shm_ring_open(name, 0, world, True, SLOT_BYTES)
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return C.shm_ring_open(name, rank, world, False, SLOT_BYTES)
        except ValueError as e:
            if "No such file" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _run(C, h, kind, x, op="sum", timeout_ms=20000, num_threads=1):
    return C.shm_ring_run(h, KIND[kind], x.data_ptr(), x.numel(), DTYPE[x.dtype], OP[op], timeout_ms, num_threads)


def _call(C, h, kind, x, op="sum"):
    status = _run(C, h, kind, x, op)
    if status != 0:
        raise RuntimeError(f"{kind} {op} {x.dtype} numel {x.numel()}: status {status}: {C.shm_ring_last_error(h)}")


def _chunks(n, world):
    base, rem = divmod(n, world)
    return [slice(c * base + min(c, rem), (c + 1) * base + min(c + 1, rem)) for c in range(world)]


def _inputs(world, n, dtype, seed, nan_every=0):
    """Every rank's input, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for r in range(world):
        if dtype.is_floating_point:
            scale = torch.pow(2.0, torch.randint(-6, 7, (n,), generator=g).float())
            x = (torch.randn(n, generator=g) * scale).to(dtype)
            if nan_every:
                x[(r * 3) % nan_every :: nan_every] = float("nan")
        elif dtype == torch.int32:
            x = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
        else:
            x = torch.randint(-(2**60), 2**60, (n,), generator=g, dtype=torch.int64)
        xs.append(x)
    return xs


def _combine(acc, x, op):
    if op in ("sum", "avg"):
        if acc.dtype == torch.int32:  # two's complement wrap
            s = acc.long() + x.long()
            return (torch.remainder(s + 2**31, 2**32) - 2**31).to(torch.int32)
        if acc.dtype == torch.int64:
            return acc + x
        return (acc.float() + x.float()).to(acc.dtype)
    f = torch.maximum if op == "max" else torch.minimum
    if acc.dtype.is_floating_point:
        return f(acc.float(), x.float()).to(acc.dtype)
    return f(acc, x)


def _ring_reference(xs, op):
    """Chunk c reduced in the ring's order: ((x_{c+1} op x_{c+2}) op ...) op x_c."""
    world = len(xs)
    out = torch.empty_like(xs[0])
    for c, sl in enumerate(_chunks(xs[0].numel(), world)):
        acc = xs[(c + 1) % world][sl].clone()
        for k in range(2, world + 1):
            acc = _combine(acc, xs[(c + k) % world][sl], op)
        if op == "avg":
            acc = acc / world if acc.dtype == torch.float32 else (acc.float() / world).to(acc.dtype)
        out[sl] = acc
    return out


def _same_bits(a, b):
    """Bitwise equality; NaNs compared by position only."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        na, nb = a.isnan(), b.isnan()
        if not torch.equal(na, nb):
            return False
        a, b = a.masked_fill(na, 0), b.masked_fill(nb, 0)
        a = a.view(torch.int32 if a.dtype == torch.float32 else torch.int16)
        b = b.view(a.dtype)
    return torch.equal(a, b)


def _digest(x):
    return hashlib.sha1(x.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------
# Scenarios (run on every rank of a group; return small picklable results)


def _scn_correctness(C, h, rank, world):
    """Every correctness check on one group: {check: [(ok, detail, digest), ...]}."""
    res = {}

    def record(check, ok, detail, x):  # x: the result every rank must hold (None: per-rank)
        res.setdefault(check, []).append((bool(ok), detail, None if x is None else _digest(x)))

    sizes = sorted({1, 7, world - 1, BIG})
    seed = 0
    for dtype in (torch.int32, torch.int64):
        for n in sizes:
            seed += 1
            xs = _inputs(world, n, dtype, seed)
            x = xs[rank].clone()
            _call(C, h, "all_reduce", x)
            ref = xs[0]
            for y in xs[1:]:
                ref = _combine(ref, y, "sum")  # exact: any order
            record("int_sum", torch.equal(x, ref), f"{dtype} n={n}", x)

    for dtype in FLOATS:
        for n in sizes:
            seed += 1
            xs = _inputs(world, n, dtype, seed)
            x = xs[rank].clone()
            _call(C, h, "all_reduce", x)
            ref = _ring_reference(xs, "sum")
            record("float_sum", _same_bits(x, ref), f"{dtype} n={n}", x)
            if n == BIG and world >= 3 and dtype != torch.float32:
                # the order is observable: a plain left-to-right fold differs somewhere
                naive = xs[0]
                for y in xs[1:]:
                    naive = _combine(naive, y, "sum")
                record("order_matters", not torch.equal(naive, ref), f"{dtype} n={n}", x)

    for dtype in FLOATS:
        for n in (7, 1003):
            seed += 1
            xs = _inputs(world, n, dtype, seed)
            x = xs[rank].clone()
            _call(C, h, "all_reduce", x, "avg")
            record("avg", _same_bits(x, _ring_reference(xs, "avg")), f"{dtype} n={n}", x)

    for op in ("max", "min"):
        for dtype in FLOATS + (torch.int32, torch.int64):
            for n in (7, 1003):
                seed += 1
                xs = _inputs(world, n, dtype, seed, nan_every=97 if dtype.is_floating_point else 0)
                x = xs[rank].clone()
                _call(C, h, "all_reduce", x, op)
                ref = _ring_reference(xs, op)
                ok = _same_bits(x, ref) and (not dtype.is_floating_point or n < 97 or bool(x.isnan().any()))
                record("max_min", ok, f"{op} {dtype} n={n}", x)

    for dtype, op in ((torch.float32, "sum"), (torch.bfloat16, "sum"), (torch.float16, "avg"), (torch.int64, "max")):
        for per in (1, 5, 100_003):
            seed += 1
            n = per * world
            xs = _inputs(world, n, dtype, seed)
            x = xs[rank].clone()
            _call(C, h, "reduce_scatter", x, op)
            mine = slice(rank * per, (rank + 1) * per)
            ref = _ring_reference(xs, op)[mine]
            record("reduce_scatter", _same_bits(x[mine], ref), f"{op} {dtype} n={n}", None)

    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for per in (1, 7, 100_003):
            seed += 1
            n = per * world
            xs = _inputs(world, n, dtype, seed)
            x = torch.full((n,), -1, dtype=dtype)
            mine = slice(rank * per, (rank + 1) * per)
            x[mine] = xs[rank][mine]
            _call(C, h, "all_gather", x)
            ref = torch.cat([xs[c][c * per : (c + 1) * per] for c in range(world)])
            record("all_gather", _same_bits(x, ref), f"{dtype} n={n}", x)

    ok, done = True, 0
    for i in range(1000):
        n = 1 + i % 13
        x = torch.full((n,), (rank + 1) * (i + 1), dtype=torch.int32)
        status = _run(C, h, "all_reduce", x)
        ok = ok and status == 0 and bool((x == (i + 1) * world * (world + 1) // 2).all())
        done += 1
    record("many_small_calls", ok, f"{done} calls", torch.zeros(1))

    for dtype in (torch.float32, torch.bfloat16):  # OpenMP inside each piece: same bits
        seed += 1
        xs = _inputs(world, BIG, dtype, seed)
        x = xs[rank].clone()
        status = _run(C, h, "all_reduce", x, num_threads=2)
        record("num_threads", status == 0 and _same_bits(x, _ring_reference(xs, "sum")), f"{dtype}", x)

    x = torch.empty(0)
    record("empty", _run(C, h, "all_reduce", x) == 0, "numel 0", x)

    C.set_isa("scalar")  # the fallback gives the same bits
    try:
        for dtype in FLOATS:
            for op in ("sum", "max"):
                seed += 1
                xs = _inputs(world, 1003, dtype, seed, nan_every=97 if op == "max" else 0)
                x = xs[rank].clone()
                _call(C, h, "all_reduce", x, op)
                record("scalar_isa", _same_bits(x, _ring_reference(xs, op)), f"{op} {dtype}", x)
    finally:
        C.set_isa("auto")
    return res


def _scn_mismatch(C, h, rank, world):
    """Rank 1 passes numel 8, the others 7; then a matching call on the same handle."""
    n = 8 if rank == 1 else 7
    x = torch.arange(n, dtype=torch.float32) + 100 * rank
    before = x.clone()
    status = _run(C, h, "all_reduce", x)
    msg = C.shm_ring_last_error(h)
    untouched = torch.equal(x, before)
    y = torch.ones(4)
    status2 = _run(C, h, "all_reduce", y)
    return status, untouched, msg, status2, torch.equal(y, torch.full((4,), float(world))), C.shm_ring_last_error(h)


def _scn_dead_peer(C, h, rank, world):
    """The last rank exits after attaching, without calling."""
    if rank == world - 1:
        os._exit(0)
    x = torch.ones(BIG)
    t0 = time.monotonic()
    status = _run(C, h, "all_reduce", x, timeout_ms=3000)
    elapsed = time.monotonic() - t0
    msg = C.shm_ring_last_error(h)
    status2 = _run(C, h, "all_reduce", x, timeout_ms=3000)
    return status, elapsed, msg, status2


def _scn_dies_mid_transfer(C, h, rank, world):
    """Every rank loops over 16 MiB all_reduces; rank 1 exits abruptly after ~30 ms."""
    if rank == 1:
        import threading

        threading.Timer(0.03, os._exit, args=(0,)).start()
    x = torch.ones(1 << 22)
    t0 = time.monotonic()
    for i in range(2000):
        status = _run(C, h, "all_reduce", x, timeout_ms=3000)
        if status != 0:
            break
    elapsed = time.monotonic() - t0
    return status, i, elapsed, C.shm_ring_last_error(h), _run(C, h, "all_reduce", x, timeout_ms=3000)


def _scn_silent_peer(C, h, rank, world):
    """Rank 1 stays alive but never calls: rank 0 times out."""
    if rank == 1:
        time.sleep(2.0)
        return None
    x = torch.ones(16)
    t0 = time.monotonic()
    status = _run(C, h, "all_reduce", x, timeout_ms=1000)
    elapsed = time.monotonic() - t0
    return status, elapsed, C.shm_ring_last_error(h), _run(C, h, "all_reduce", x, timeout_ms=1000)


SCENARIOS = {
    "correctness": _scn_correctness,
    "mismatch": _scn_mismatch,
    "dead_peer": _scn_dead_peer,
    "silent_peer": _scn_silent_peer,
    "dies_mid_transfer": _scn_dies_mid_transfer,
}


def _worker(scenario, rank, world, name, barrier, results):
    try:
        torch.set_num_threads(1)
        from ringfuse import _C as C

        h = _open(C, name, rank, world)
        barrier.wait(30)  # every rank attached
        if rank == 0:
            C.shm_ring_unlink(name)
        out = SCENARIOS[scenario](C, h, rank, world)
        C.shm_ring_close(h)
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_group(scenario, world, exits=None, timeout=60.0):
    """Run `scenario` on `world` spawned ranks; {rank: result} of the ranks that report.

    exits: {rank: exit code} for ranks expected to die without reporting."""
    exits = exits or {}
    ctx = mp.get_context("spawn")
    name = f"rf_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    barrier, results = ctx.Barrier(world), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(scenario, r, world, name, barrier, results), daemon=True)
        for r in range(world)
    ]
    try:
        for p in procs:
            p.start()
        out, deadline = {}, time.monotonic() + timeout
        while len(out) < world - len(exits):
            try:
                rank, kind, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_mod.Empty:
                raise AssertionError(f"{scenario} world {world}: only ranks {sorted(out)} reported in {timeout} s")
            assert kind == "ok", f"rank {rank} failed:\n{payload}"
            out[rank] = payload
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        assert [p.exitcode for p in procs] == [exits.get(r, 0) for r in range(world)]
        assert not os.path.exists(f"/dev/shm/{name}"), "segment left behind"
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        from ringfuse import _C as C

        C.shm_ring_unlink(name)


# ---------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def group(request):
    world = request.param
    return world, run_group("correctness", world, timeout=120.0)


def _check(group, check):
    world, out = group
    assert sorted(out) == list(range(world))
    n_entries = len(out[0][check])
    assert n_entries > 0
    for i in range(n_entries):
        for r in range(world):
            ok, detail, _ = out[r][check][i]
            assert ok, f"{check}: rank {r}: {detail}"
        digests = {out[r][check][i][2] for r in range(world)}
        assert len(digests) == 1 or None in digests, f"{check}: {out[0][check][i][1]}: ranks disagree"


def test_int_sum_exact(group):
    _check(group, "int_sum")


def test_float_sum_bitwise_fixed_order(group):
    _check(group, "float_sum")
    if group[0] >= 3:
        _check(group, "order_matters")


def test_avg(group):
    _check(group, "avg")


def test_max_min_nan_propagates(group):
    _check(group, "max_min")


def test_reduce_scatter(group):
    _check(group, "reduce_scatter")


def test_all_gather(group):
    _check(group, "all_gather")


def test_many_small_calls(group):
    _check(group, "many_small_calls")


def test_num_threads_same_bits(group):
    _check(group, "num_threads")


def test_empty(group):
    _check(group, "empty")


def test_scalar_isa_same_bits(group):
    _check(group, "scalar_isa")


@pytest.mark.parametrize("world", [2, 3])
def test_mismatch_detected_on_every_rank(world):
    out = run_group("mismatch", world)
    for r in range(world):
        status, untouched, msg, status2, summed, msg2 = out[r]
        assert status == 3, (r, msg)
        assert untouched, r
        assert "rank 1 passed all_reduce numel 8 dtype float32 op sum" in msg, msg
        assert "rank 0 passed all_reduce numel 7" in msg, msg
        assert status2 == 0 and summed, (r, msg2)  # nothing moved: the handle stays usable


def test_dead_peer_raises_everywhere():
    world = 3
    out = run_group("dead_peer", world, exits={world - 1: 0})
    for r in range(world - 1):
        status, elapsed, msg, status2 = out[r]
        assert status in (1, 2), (r, status, msg)
        assert elapsed < 3.0 + 2.0, (r, elapsed)
        assert f"rank {world - 1} (pid" in msg, msg
        assert status2 == 4


def test_peer_dies_mid_transfer():
    world = 3
    out = run_group("dies_mid_transfer", world, exits={1: 0})
    for r in (0, 2):
        status, calls, elapsed, msg, status2 = out[r]
        assert status in (1, 2), (r, status, calls, msg)
        assert "rank 1 (pid" in msg, msg
        assert elapsed < 0.03 + 3.0 + 2.0, (r, elapsed)
        assert status2 == 4


def test_silent_peer_times_out():
    out = run_group("silent_peer", 2)
    status, elapsed, msg, status2 = out[0]
    assert status == 1, msg
    assert 0.9 < elapsed < 3.0, elapsed
    assert "rank 1 (pid" in msg and "did not answer within 1000 ms" in msg, msg
    assert status2 == 4
    assert out[1] is None


def test_open_validation_and_bad_arguments():
    from ringfuse import _C as C

    name = f"rf_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    h = C.shm_ring_open(name, 0, 2, True, SLOT_BYTES)
    try:
        with pytest.raises(ValueError, match="already attached"):
            C.shm_ring_open(name, 0, 2, False, SLOT_BYTES)
        with pytest.raises(ValueError, match="expected"):  # another world: another size
            C.shm_ring_open(name, 1, 3, False, SLOT_BYTES)
        with pytest.raises(ValueError, match="File exists"):
            C.shm_ring_open(name, 0, 2, True, SLOT_BYTES)
        x = torch.ones(8, dtype=torch.int32)
        with pytest.raises(ValueError, match="avg needs a float dtype"):
            _run(C, h, "all_reduce", x, "avg")
        with pytest.raises(ValueError, match="divisible by world"):
            _run(C, h, "reduce_scatter", torch.ones(7))
        with pytest.raises(ValueError, match="dtype"):
            C.shm_ring_run(h, 0, x.data_ptr(), 8, 3, 0, 1000, 1)  # int8
        with pytest.raises(ValueError, match="kind"):
            C.shm_ring_run(h, 7, x.data_ptr(), 8, 4, 0, 1000, 1)
        with pytest.raises(ValueError, match="null"):
            C.shm_ring_run(h, 0, 0, 8, 4, 0, 1000, 1)
    finally:
        C.shm_ring_close(h)
        C.shm_ring_unlink(name)
    with pytest.raises(ValueError, match="closed handle"):
        C.shm_ring_close(h)
    with pytest.raises(ValueError, match="No such file"):
        C.shm_ring_open(name, 1, 2, False, SLOT_BYTES)
    C.shm_ring_unlink(name)  # missing: fine
    for bad in ((0, 0, 1 << 20), (2, 2, 1 << 20), (0, 65, 1 << 20), (0, 2, 1000)):
        with pytest.raises(ValueError):
            C.shm_ring_open(name, bad[0], bad[1], True, bad[2])
    assert not os.path.exists(f"/dev/shm/{name}")


def test_unattached_peer_and_concurrent_use():
    """Rank 1 never attaches: rank 0 times out; meanwhile a second call or a close on the busy
    handle is refused."""
    import threading

    from ringfuse import _C as C

    name = f"rf_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    h = C.shm_ring_open(name, 0, 2, True, SLOT_BYTES)
    C.shm_ring_unlink(name)
    x = torch.ones(5)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("status", _run(C, h, "all_reduce", x, timeout_ms=600)))
    try:
        t.start()
        time.sleep(0.1)
        with pytest.raises(ValueError, match="concurrent calls"):
            _run(C, h, "all_reduce", torch.ones(5))
        with pytest.raises(ValueError, match="close while a call"):
            C.shm_ring_close(h)
        t.join(10)
        assert got["status"] == 1
        assert "rank 1 (not attached) did not answer within 600 ms" in C.shm_ring_last_error(h)
        assert _run(C, h, "all_reduce", x) == 4
        assert torch.equal(x, torch.ones(5))
    finally:
        t.join(10)
        C.shm_ring_close(h)


def test_world_one_is_identity():
    from ringfuse import _C as C

    name = f"rf_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    h = C.shm_ring_open(name, 0, 1, True, SLOT_BYTES)
    C.shm_ring_unlink(name)
    try:
        for dtype in FLOATS:
            x = torch.randn(1001).to(dtype)
            before = x.clone()
            for op in ("sum", "avg", "max", "min"):
                assert _run(C, h, "all_reduce", x, op) == 0
            assert _run(C, h, "all_gather", x) == 0
            assert _run(C, h, "reduce_scatter", x) == 0
            assert _same_bits(x, before)
    finally:
        C.shm_ring_close(h)
