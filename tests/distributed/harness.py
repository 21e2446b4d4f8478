"""Start N ranks as spawned processes on a gloo group and collect what each returns.

Each rank runs ``fn(rank, world, *args)`` (a module-level function, as spawn needs) after
``init_process_group("gloo")`` on a free loopback port (``use_cuda=True``: rank r first
selects cuda:r and the group is "cpu:gloo,cuda:nccl"); its return value comes back through
a queue (tensors, CUDA ones copied to CPU first, as (dtype, shape, raw bytes), so nothing
rides on shared-memory handles). A rank that raises returns the exception's type name and
message instead.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RAW = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def pack(t: torch.Tensor):
    raw = t.detach().cpu().contiguous().view(_RAW.get(t.dtype, t.dtype))
    return ("tensor", str(t.dtype), tuple(t.shape), raw.numpy().tobytes())


def unpack(obj):
    if isinstance(obj, tuple) and obj and obj[0] == "tensor":
        _, dtype, shape, data = obj
        dtype = getattr(torch, dtype.split(".")[1])
        raw = torch.frombuffer(bytearray(data), dtype=_RAW.get(dtype, dtype)) if data else torch.empty(0, dtype=_RAW.get(dtype, dtype))
        return raw.view(dtype).reshape(shape)
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack(o) for o in obj)
    if isinstance(obj, dict):
        return {k: unpack(v) for k, v in obj.items()}
    return obj


def packed(obj):
    if isinstance(obj, torch.Tensor):
        return pack(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(packed(o) for o in obj)
    if isinstance(obj, dict):
        return {k: packed(v) for k, v in obj.items()}
    return obj


def _entry(fn, rank, world, port, queue, args, pg_timeout_s, use_cuda=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if use_cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))  # fmt: skip
        # every rank through torch's own set-up before the test runs: gloo's rendezvous can
        # still read the store (hosted by rank 0) after rank 0 has returned from it, so a
        # test's rank 0 that dies at once failed its peer inside init_process_group
        # (DistNetworkError), not in the ringfuse call the test is about (seen once in CI)
        dist.barrier()
        result = fn(rank, world, *args)
        queue.put((rank, "ok", packed(result)))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        try:
            from ringfuse import distributed as rdist

            rdist.destroy()
        except Exception:  # noqa: BLE001
            pass
    queue.close()
    queue.join_thread()  # the result is in the pipe before the process goes
    os._exit(0)  # skip gloo's teardown, which can block on a peer that is gone


def run_ranks(fn, world: int, *args, timeout_s: float = 120.0, pg_timeout_s: float = 60.0, allow_missing=(),
              use_cuda: bool = False):  # fmt: skip
    """{rank: ("ok", value) or ("error", (type name, message, traceback))}. Ranks in
    ``allow_missing`` may exit without reporting (a test's dead peer). ``use_cuda``: rank r
    on cuda:r (needs ``world`` devices), group "cpu:gloo,cuda:nccl"."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args, pg_timeout_s, use_cuda), daemon=True)
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    results = {}
    required = set(range(world)) - set(allow_missing)
    try:
        while not required <= results.keys():
            rank, status, value = queue.get(timeout=timeout_s)
            results[rank] = (status, unpack(value) if status == "ok" else value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return results


def values(results):
    """Every rank's value, failing with the first rank's traceback if one raised."""
    for rank in sorted(results):
        status, value = results[rank]
        assert status == "ok", f"rank {rank} raised {value[0]}: {value[1]}\n{value[2]}"
    return [results[r][1] for r in sorted(results)]
