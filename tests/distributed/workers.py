"""Rank bodies for tests/distributed (module-level so spawned processes can import them)."""

from __future__ import annotations

import datetime
import os
import signal
import time

import torch
import torch.distributed as dist

from ringfuse import distributed as rdist


def rank_input(rank: int, numel: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if dtype.is_floating_point:
        return (torch.randn(numel, generator=g) * 3).to(dtype)
    return torch.randint(-(2**30), 2**30, (numel,), generator=g, dtype=dtype)


def collectives(rank, world, backend, cases):
    """cases: (kind, numel, dtype name, op, seed); returns each result."""
    out = []
    for kind, numel, dtype, op, seed in cases:
        x = rank_input(rank, numel, getattr(torch, dtype), seed)
        if kind == "all_reduce":
            out.append(rdist.all_reduce(x, op, backend=backend))
        elif kind == "reduce_scatter":
            out.append(rdist.reduce_scatter(x, op, backend=backend))
        else:
            out.append(rdist.all_gather(x, backend=backend))
    out.append(rdist.get_communicator(None, backend).backend)
    return out


def two_groups(rank, world, backend):
    """The default group and a subgroup of ranks {0, 1}, used alternately."""
    sub = dist.new_group([0, 1])
    out = []
    for i in range(6):
        x = torch.full((5,), float(rank + 1 + i))
        if i % 2 == 0:
            out.append(rdist.all_reduce(x, backend=backend))
        elif rank in (0, 1):
            out.append(rdist.all_reduce(x, group=sub, backend=backend))
    return out


def many_small_calls(rank, world, backend, calls):
    x = torch.zeros(3, dtype=torch.int64)
    for i in range(calls):
        x.fill_(i + rank)
        rdist.all_reduce(x, backend=backend)
        if int(x[0]) != world * i + world * (world - 1) // 2:
            raise AssertionError(f"call {i}: {x.tolist()}")
    return calls


def dead_peer(rank, world, backend, timeout_s, how="exit"):
    rdist.set_timeout(timeout_s)
    rdist.all_reduce(torch.ones(4), backend=backend)  # everyone is alive: builds the communicator
    if rank == world - 1:
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "exception":
            raise RuntimeError("rank failed before the collective")  # reported; the process then exits
        os._exit(0)  # dies without a word
    t0 = time.monotonic()
    try:
        rdist.all_reduce(torch.ones(4), backend=backend)
    except rdist.RingTimeoutError as e:
        return ("RingTimeoutError", time.monotonic() - t0, str(e))
    return ("no error", time.monotonic() - t0, "")


def mismatched(rank, world, backend, what):
    numel = 8 + (rank if what == "numel" else 0)
    x = torch.ones(numel, dtype=torch.int32 if what == "dtype" and rank == 1 else torch.float32)
    op = "max" if what == "op" and rank == 1 else "sum"
    before = x.clone()
    try:
        rdist.all_reduce(x, op, backend=backend)
    except rdist.RingMismatchError as e:
        return ("RingMismatchError", str(e), bool(torch.equal(x, before)))
    return ("no error", "", True)


def ddp_losses(rank, world, use_ring, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if use_ring:
        ddp.register_comm_hook(None, rdist.ddp_comm_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        y = x.sum(1, keepdim=True).sin()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _outcome(fn, *args, **kwargs):
    """(exception type name or "ok", seconds, message) of fn(*args, **kwargs)."""
    t0 = time.monotonic()
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the test checks the type
        return (type(e).__name__, time.monotonic() - t0, str(e))
    return ("ok", time.monotonic() - t0, "")


def creator_dies(rank, world, backend, timeout_s, subgroup):
    """The ring's rank 0 SIGKILLs itself while creating its segment (RINGFUSE_TEST_SHM_DIE,
    set by the test, says at which point). subgroup: the ring runs on ranks 1.. only, so
    global rank 0 (the store's host) stays alive until the last rank says it is done."""
    rdist.set_timeout(timeout_s)
    group = dist.new_group(list(range(1, world))) if subgroup else None
    store = dist.distributed_c10d._get_default_store()
    if subgroup and rank == 0:
        store.wait(["test/done"], datetime.timedelta(seconds=60))
        return None
    out = _outcome(rdist.all_reduce, torch.ones(4), "sum", group, backend=backend)
    if subgroup and rank == world - 1:
        store.set("test/done", "1")
    return out


def silent_first_call(rank, world, backend, timeout_s, silent):
    """Rank `silent` stays alive but never makes the first collective."""
    rdist.set_timeout(timeout_s)
    if rank == silent:
        time.sleep(timeout_s + 4)
        return None
    return _outcome(rdist.all_reduce, torch.ones(4), "sum", None, backend=backend)


def mismatch_then_valid(rank, world, backend):
    """A mismatched call, then a valid one on the same communicator."""
    first = _outcome(rdist.all_reduce, torch.ones(8 + rank), "sum", None, backend=backend)
    y = torch.full((5,), float(rank + 1))
    second = _outcome(rdist.all_reduce, y, "sum", None, backend=backend)
    return first, second, y


def bench_body_dies(rank, world):
    """A bench body (ringfuse.bench.harness.run_ranks) whose ranks die without reporting."""
    os.kill(os.getpid(), signal.SIGKILL)


def bench_body_rank0_dies_then_rank1_fails(rank, world):
    """Rank 0 is killed; rank 1 then fails (as a peer whose store connection was reset does)."""
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    raise RuntimeError("lost rank 0")


def default_group_made_again(rank, world, backend, port):
    """A call on the default group, then destroy_process_group() and a new default group in
    which the processes have each other's ranks: the new group must get its own communicator
    (the first one was keyed "default" and kept serving, with the old ranks)."""
    rdist.all_reduce(torch.ones(4), backend=backend)
    dist.barrier()
    dist.destroy_process_group()
    new_rank = world - 1 - rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=new_rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    r = dist.get_rank()
    gathered = rdist.all_gather(torch.tensor([float(r)]), backend=backend)
    scattered = rdist.reduce_scatter(torch.arange(world * 2, dtype=torch.float32) * (r + 1), backend=backend)
    return r, gathered, scattered


def none_and_world_share_a_communicator(rank, world, backend, timeout_s):
    """group=None and group=dist.group.WORLD are one group: one communicator (two had two,
    over the same store keys), and set_timeout(None) is the timeout of both spellings."""
    rdist.set_timeout(timeout_s)
    a = rdist.get_communicator(None, backend)
    b = rdist.get_communicator(dist.group.WORLD, backend)
    x = torch.full((3,), float(rank + 1))
    rdist.all_reduce(x, group=dist.group.WORLD, backend=backend)
    return a is b, a.timeout_s, x
