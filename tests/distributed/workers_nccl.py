"""Rank bodies for tests/distributed/test_allreduce_nccl.py (module-level so spawned processes
can import them). They run under harness.run_ranks(..., use_cuda=True): rank r on cuda:r,
group "cpu:gloo,cuda:nccl"."""

from __future__ import annotations

import time

import torch

from ringfuse import _C
from ringfuse import distributed as rdist
from ringfuse.distributed import allreduce as ar
from ringfuse.ops import native

from .workers import rank_input


def _on_gpu(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x copied to this rank's device, starting `offset` elements into its allocation (an
    odd offset: a data pointer that is not 16-byte aligned)."""
    buf = torch.full((x.numel() + offset,), 7, dtype=x.dtype, device="cuda")
    out = buf[offset:]
    out.copy_(x)
    return out


def _collective(kind, x, op, backend):
    if kind == "all_reduce":
        return rdist.all_reduce(x, op, backend=backend)
    if kind == "reduce_scatter":
        return rdist.reduce_scatter(x, op, backend=backend)
    return rdist.all_gather(x, backend=backend)


def nccl_vs_cpu(rank, world, cases, piece_bytes=None, side_stream=False):
    """cases: (kind, numel, dtype name, op, seed, offset, backend). Each case runs on this
    rank's GPU through `backend` ("nccl" or "auto") and on CPU through the torch transport;
    returns [(gpu result on CPU, cpu result)] + [auto's choice, backend_for]."""
    if piece_bytes:
        ar.NCCL_PIECE_BYTES = piece_bytes
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    out = []
    for kind, numel, dtype, op, seed, offset, backend in cases:
        x = rank_input(rank, numel, getattr(torch, dtype), seed)
        with torch.cuda.stream(stream):
            xg = _on_gpu(x, offset)
            xg.mul_(1)  # queued work on the stream before the collective: it must come first
            got = _collective(kind, xg, op, backend).clone()  # and work queued after it sees the result
        stream.synchronize()
        want = _collective(kind, x.clone(), op, "torch")
        out.append((got.cpu(), want))
    dev = torch.device("cuda", torch.cuda.current_device())
    out.append((rdist.get_communicator(None, "auto", dev).backend, rdist.backend_for(torch.ones(1, device=dev))))
    return out


def many_small_calls(rank, world, calls):
    x = torch.zeros(3, dtype=torch.int64, device="cuda")
    for i in range(calls):
        x.fill_(i + rank)
        rdist.all_reduce(x, backend="nccl")
        if int(x[0]) != world * i + world * (world - 1) // 2:
            raise AssertionError(f"call {i}: {x.tolist()}")
    return calls


def mismatched(rank, world, what):
    """Ranks disagree on numel, dtype or op: RingMismatchError on every rank with the data
    untouched; the communicator still works for the next (matching) call."""
    numel = 8 + (rank if what == "numel" else 0)
    dtype = torch.int32 if what == "dtype" and rank == 1 else torch.float32
    x = torch.ones(numel, dtype=dtype, device="cuda")
    op = "max" if what == "op" and rank == 1 else "sum"
    before = x.clone()
    try:
        rdist.all_reduce(x, op, backend="nccl")
        result = ("no error", "", True)
    except rdist.RingMismatchError as e:
        result = ("RingMismatchError", str(e), bool(torch.equal(x, before)))
    y = torch.full((5,), float(rank + 1), device="cuda")
    rdist.all_reduce(y, backend="nccl")
    return result + (y.cpu(),)


def dead_peer(rank, world, timeout_s):
    """The last rank exits after the first call; the others raise RingTimeoutError (from the
    handshake over the store) within the timeout."""
    rdist.set_timeout(timeout_s)
    rdist.all_reduce(torch.ones(4, device="cuda"), backend="nccl")
    if rank == world - 1:
        import os

        os._exit(0)
    t0 = time.monotonic()
    try:
        rdist.all_reduce(torch.ones(4, device="cuda"), backend="nccl")
    except rdist.RingTimeoutError as e:
        return ("RingTimeoutError", time.monotonic() - t0, str(e))
    return ("no error", time.monotonic() - t0, "")


def peer_never_calls(rank, world, timeout_ms):
    """Past the handshake, rank 0 enters the NCCL ring (through _C) and rank 1 never does:
    rank 0's call returns status 1 within about timeout_ms with a message that says so,
    the communicator is aborted, and the next call returns 4 (broken)."""
    x = torch.ones(1 << 20, device="cuda")
    rdist.all_reduce(x, backend="nccl")  # builds the communicator, connects the ring
    transport = rdist.get_communicator(None, "nccl", x.device).transport
    transport.failed = True  # the ring will be aborted on rank 0: close without NCCL's finalize
    if rank != 0:
        time.sleep(timeout_ms / 1000 + 5)
        return None
    stream = torch.cuda.current_stream().cuda_stream
    t0 = time.monotonic()
    status = _C.nccl_ring_run(transport.handle, 0, x.data_ptr(), x.numel(), 0, 0, stream, timeout_ms)
    elapsed = time.monotonic() - t0
    message = _C.nccl_last_error(transport.handle)
    again = _C.nccl_ring_run(transport.handle, 0, x.data_ptr(), x.numel(), 0, 0, stream, timeout_ms)
    torch.cuda.synchronize()  # the aborted ring drained: the stream is usable
    return (status, elapsed, message, again, _C.nccl_last_error(transport.handle))


class _FakeC:
    """Stands in for _C's NCCL entries (no GPU here): records what NcclTransport passes."""

    def __init__(self):
        self.opened = None

    def nccl_unique_id(self):
        import os

        return os.urandom(128)

    def nccl_comm_open(self, uid, rank, world, device, piece_bytes, timeout_ms):
        self.opened = (bytes(uid), rank, world, device, piece_bytes, timeout_ms)
        return 1

    def nccl_comm_close(self, handle, abort):
        self.closed = (handle, abort)


def fake_transport_handshakes(rank, world, calls, mismatch_at):
    """NcclTransport's control plane without NCCL: the unique id through the store, the
    arrival barrier, then `calls` handshakes (rank 1 passes numel + 1 at call
    `mismatch_at`); returns what comm_open got, every handshake's answer and the number of
    keys left in the store."""
    fake = _FakeC()
    saved, native._C = native._C, fake  # NcclTransport reaches _C only through ops.native
    ar._nccl_version = 1  # no library to load
    try:
        store = ar._store_of(None)
        t = ar.NcclTransport(None, rank, world, 10.0, store, torch.device("cuda", rank), piece_bytes=8192)
        answers = []
        for i in range(calls):
            desc = [0, 100 + i + (1 if rank == 1 and i == mismatch_at else 0), 0, 0]
            answers.append(t.handshake(desc))
        left = sum(1 for n in range(1, calls + 1) for q in range(world)
                   if store.check([f"{t.key}/call/{n}/{q}"]))  # fmt: skip
        torch.distributed.barrier()  # rank 0 hosts the store: nobody exits while another still reads it
        t.close()
        return fake.opened, answers, left, fake.closed
    finally:
        native._C = saved
        ar._nccl_version = None


def fake_transport_dead_peer(rank, world, timeout_s):
    """Rank world-1 exits after two handshakes: the others' next handshake raises
    RingTimeoutError within the timeout, and close then aborts."""
    fake = _FakeC()
    saved, native._C = native._C, fake
    ar._nccl_version = 1
    try:
        t = ar.NcclTransport(None, rank, world, timeout_s, ar._store_of(None), torch.device("cuda", rank))
        t.handshake([0, 1, 0, 0])
        t.handshake([0, 1, 0, 0])
        if rank == world - 1:
            import os

            os._exit(0)
        t0 = time.monotonic()
        try:
            t.handshake([0, 1, 0, 0])
            result = ("no error", time.monotonic() - t0, "")
        except ar.RingTimeoutError as e:
            result = ("RingTimeoutError", time.monotonic() - t0, str(e))
        t.close()
        return result + (fake.closed,)
    finally:
        native._C = saved
        ar._nccl_version = None
