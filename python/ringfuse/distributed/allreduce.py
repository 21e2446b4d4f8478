"""Ring all-reduce, reduce-scatter and all-gather over pluggable transports.

One schedule everywhere (the classic ring): with N ranks the tensor is split into N chunks;
N-1 reduce-scatter steps, in which rank r sends chunk (r - s - 1) mod N to rank r + 1 and
folds chunk (r - s - 2) mod N received from rank r - 1 into its own copy, leave rank r with
the fully reduced chunk r; N-1 all-gather steps pass the reduced chunks around. Every
element of chunk c is combined in the fixed order ((x_{c+1} op x_{c+2}) op ...) op x_c,
``combine(received, local)`` at each step (fp16 / bf16 in fp32, rounded back once per
step), so results are bitwise identical on every rank, every run and every transport.

Transports (``backend=``):
- ``"shm"``: processes on one host, CPU tensors: a POSIX shared-memory segment per group
  and the ring in C++ (csrc/cpu/allreduce.cpp): pipelined pieces, acquire/release flags,
  AVX2 combine. The segment name travels through the group's store, and rank 0 unlinks it
  as soon as every rank has attached, so nothing outlives the processes.
- ``"torch"``: torch.distributed send/recv (gloo or nccl) on the group, the same schedule
  driven from Python: works across hosts.
- ``"auto"``: shm when every rank of the group runs on this host and the tensor is on CPU,
  else torch.

torch.distributed stays the control plane (process groups, stores, torchrun's
environment); ringfuse's ring is the data plane. A peer that dies or stops answering makes
every other rank raise ``RingTimeoutError`` within the communicator's timeout; ranks that
pass different sizes, dtypes or ops get ``RingMismatchError`` before any data moves.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid

import torch
import torch.distributed as dist

from .. import _C

OPS = {"sum": 0, "avg": 1, "max": 2, "min": 3}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 4, torch.int64: 5}
ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER = 0, 1, 2
KIND_NAME = {ALL_REDUCE: "all_reduce", REDUCE_SCATTER: "reduce_scatter", ALL_GATHER: "all_gather"}
BACKENDS = ("auto", "shm", "torch")
DEFAULT_TIMEOUT_S = 60.0
SHM_SLOT_BYTES = 1 << 20  # one of the two double-buffer slots per rank


class RingTimeoutError(RuntimeError):
    """A peer died or did not answer within the communicator's timeout. The communicator
    is unusable afterwards (its peers may be mid-call): build a new group."""


class RingMismatchError(ValueError):
    """Ranks called the same collective with different sizes, dtypes or ops."""


# ---------------------------------------------------------------------------------------
# The schedule's arithmetic, shared by the Python transport and the tests' reference


def chunk_bounds(numel: int, world: int) -> list[tuple[int, int]]:
    """The ring's N chunks of [0, numel): the first numel % N one element longer."""
    base, extra = divmod(numel, world)
    bounds, start = [], 0
    for c in range(world):
        end = start + base + (1 if c < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def combine(op: str, received: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """One ring step's reduction, in the tensor's dtype (fp16 / bf16 computed in fp32)."""
    a, b = received, local
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    if op in ("sum", "avg"):
        r = a + b
    elif op == "max":
        r = torch.maximum(a, b)
    else:
        r = torch.minimum(a, b)
    return r.to(local.dtype)


def finish_avg(chunk: torch.Tensor, world: int) -> None:
    """avg = the ring's sum divided by N once, by the chunk's owner (fp32 for fp16 / bf16)."""
    if chunk.dtype in (torch.float16, torch.bfloat16):
        chunk.copy_((chunk.float() / world).to(chunk.dtype))
    else:
        chunk.div_(world)


# ---------------------------------------------------------------------------------------
# Transports


class TorchTransport:
    """The ring over torch.distributed point-to-point (gloo, nccl): any hosts."""

    name = "torch"

    def __init__(self, group, rank: int, world: int, timeout_s: float):
        self.group, self.rank, self.world = group, rank, world
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.next = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
        self.prev = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world

    def _wait(self, works, what):
        for w in works:
            try:
                w.wait(self.timeout)
            except RuntimeError as e:  # gloo: timeout, or the peer's socket closed
                raise RingTimeoutError(f"ringfuse.distributed: {what} failed on rank {self.rank}: {e}") from e

    def _exchange(self, send: torch.Tensor, recv: torch.Tensor, what: str) -> None:
        ops = []
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send, self.next, self.group))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group))
        if ops:
            self._wait(dist.batch_isend_irecv(ops), what)

    def handshake(self, desc: list[int]) -> list[list[int]]:
        mine = torch.tensor(desc, dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        self._wait([dist.all_gather(everyone, mine, group=self.group, async_op=True)], "the handshake")
        return [t.tolist() for t in everyone]

    def run(self, kind: int, flat: torch.Tensor, op: str) -> None:
        n, r = self.world, self.rank
        if kind == ALL_REDUCE:
            bounds = chunk_bounds(flat.numel(), n)
        else:
            size = flat.numel() // n
            bounds = [(c * size, (c + 1) * size) for c in range(n)]
        part = [flat[b:e] for b, e in bounds]
        if kind in (ALL_REDUCE, REDUCE_SCATTER):
            scratch = torch.empty(max(e - b for b, e in bounds), dtype=flat.dtype)
            for s in range(n - 1):
                c_send, c_recv = (r - s - 1) % n, (r - s - 2) % n
                recv = scratch[: part[c_recv].numel()]
                self._exchange(part[c_send], recv, f"reduce-scatter step {s}")
                part[c_recv].copy_(combine(op, recv, part[c_recv]))
            if op == "avg":
                finish_avg(part[r], n)
        if kind in (ALL_REDUCE, ALL_GATHER):
            for s in range(n - 1):
                self._exchange(part[(r - s) % n], part[(r - s - 1) % n], f"all-gather step {s}")

    def close(self) -> None:
        pass


class ShmTransport:
    """The ring in C++ over one POSIX shared-memory segment (processes on one host)."""

    name = "shm"

    def __init__(self, group, rank: int, world: int, timeout_s: float, store, slot_bytes: int = SHM_SLOT_BYTES):
        self.rank, self.world, self.timeout_ms = rank, world, int(timeout_s * 1000)
        self.handle = None
        key = f"ringfuse/shm/{_next_id(group, 'segment')}"
        if rank == 0:
            name = f"/ringfuse-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.handle = _C.shm_ring_open(name, 0, world, True, slot_bytes)
            try:
                store.set(key + "/name", name)
                store.add(key + "/attached", 1)
                _wait_counter(store, key + "/attached", world, timeout_s)
            finally:
                _C.shm_ring_unlink(name)  # every rank attached (or gave up): the name can go
        else:
            store.wait([key + "/name"], datetime.timedelta(seconds=timeout_s))
            name = store.get(key + "/name").decode()
            self.handle = _C.shm_ring_open(name, rank, world, False, slot_bytes)
            store.add(key + "/attached", 1)

    def handshake(self, desc):
        return None  # the C++ ring compares every rank's call before moving data

    def run(self, kind: int, flat: torch.Tensor, op: str) -> None:
        status = _C.shm_ring_run(self.handle, kind, flat.data_ptr(), flat.numel(), DTYPE_CODE[flat.dtype], OPS[op],
                                 self.timeout_ms, 1)  # fmt: skip
        if status == 0:
            return
        detail = _C.shm_ring_last_error(self.handle)
        if status == 3:
            raise RingMismatchError(f"ringfuse.distributed: ranks disagree on the call: {detail}")
        raise RingTimeoutError(f"ringfuse.distributed: shared-memory ring failed on rank {self.rank}: {detail}")

    def close(self) -> None:
        if self.handle is not None:
            _C.shm_ring_close(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown or a call still running: the OS unmaps it
            pass


def _group_key(group):
    """This process's key for a group (store keys need no group name: each group's store is
    already prefixed by it)."""
    return "default" if group is None else id(group)


_counters: dict = {}


def _next_id(group, what: str) -> int:
    """A per-group counter: every rank builds its communicators in the same order, so the
    n-th one of a group has the same store keys on every rank."""
    key = (_group_key(group), what)
    _counters[key] = _counters.get(key, 0) + 1
    return _counters[key]


def _wait_counter(store, key: str, target: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < target:
        if time.monotonic() > deadline:
            raise RingTimeoutError(f"ringfuse.distributed: only {store.add(key, 0)} of {target} ranks attached to "
                                   f"the shared-memory segment within {timeout_s:.0f} s")  # fmt: skip
        time.sleep(0.001)


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _store_of(group):
    pg = group if group is not None else dist.group.WORLD
    return dist.distributed_c10d._get_process_group_store(pg)


# ---------------------------------------------------------------------------------------
# Communicators: one per (group, backend), created on first use and cached


class Communicator:
    def __init__(self, group, backend: str, timeout_s: float):
        self.group, self.timeout_s = group, timeout_s
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.broken: str | None = None
        store = _store_of(group)
        if backend == "auto":
            shm = hasattr(_C, "shm_ring_open") and _all_on_this_host(group, store, self.world, timeout_s)
            backend = "shm" if shm else "torch"
        self.backend = backend
        if backend == "shm":
            self.transport = ShmTransport(group, self.rank, self.world, timeout_s, store)
        else:
            self.transport = TorchTransport(group, self.rank, self.world, timeout_s)

    def run(self, kind: int, flat: torch.Tensor, op: str) -> None:
        if self.broken:
            raise RingTimeoutError(f"ringfuse.distributed: this communicator failed earlier ({self.broken}); "
                                   "create a new process group")  # fmt: skip
        if self.world == 1:
            return  # the ring of one: sum / max / min / avg of one rank are the input
        desc = [kind, flat.numel(), DTYPE_CODE[flat.dtype], OPS[op]]
        try:
            everyone = self.transport.handshake(desc)
            if everyone is not None and any(d != desc for d in everyone):
                raise RingMismatchError(_mismatch_message(everyone))
            self.transport.run(kind, flat, op)
        except RingTimeoutError as e:
            self.broken = str(e)
            raise


def _mismatch_message(everyone) -> str:
    inv_dtype = {v: k for k, v in DTYPE_CODE.items()}
    inv_op = {v: k for k, v in OPS.items()}
    parts = [f"rank {r}: {KIND_NAME.get(k, k)} of {n} x {inv_dtype.get(d, d)} op {inv_op.get(o, o)}"
             for r, (k, n, d, o) in enumerate(everyone)]  # fmt: skip
    return "ringfuse.distributed: ranks disagree on the call (" + "; ".join(parts) + ")"


def _all_on_this_host(group, store, world: int, timeout_s: float) -> bool:
    key = f"ringfuse/host/{_next_id(group, 'host')}"
    me = _host_id()
    store.set(f"{key}/{dist.get_rank(group)}", me)
    keys = [f"{key}/{r}" for r in range(world)]
    store.wait(keys, datetime.timedelta(seconds=timeout_s))
    return all(store.get(k).decode() == me for k in keys)


_communicators: dict = {}
_timeouts: dict = {}


def set_timeout(seconds: float, group=None) -> None:
    """The timeout (default 60 s) of communicators created from now on for ``group``."""
    if not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"set_timeout: seconds must be a positive number, got {seconds!r}")
    _timeouts[_group_key(group)] = float(seconds)


def get_communicator(group=None, backend: str = "auto") -> Communicator:
    """The cached communicator of ``group`` (None: the default group) for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"ringfuse.distributed: backend must be one of {BACKENDS}, got {backend!r}")
    if not dist.is_initialized():
        raise RuntimeError("ringfuse.distributed: torch.distributed is not initialized; call "
                           "ringfuse.distributed.init() (reads torchrun's environment) first")  # fmt: skip
    key = (_group_key(group), backend)
    comm = _communicators.get(key)
    if comm is None:
        comm = Communicator(group, backend, _timeouts.get(_group_key(group), DEFAULT_TIMEOUT_S))
        _communicators[key] = comm
    return comm


def destroy() -> None:
    """Close every cached communicator (their shared-memory mappings included)."""
    for comm in _communicators.values():
        comm.transport.close()
    _communicators.clear()


# ---------------------------------------------------------------------------------------
# Public collectives


def _check(op_name: str, tensor, op: str, backend: str):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op_name}: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in DTYPE_CODE:
        raise TypeError(f"{op_name}: dtype must be one of {tuple(str(d) for d in DTYPE_CODE)}, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{op_name}: tensor must be contiguous (the ring works on its flat storage)")
    if op not in OPS:
        raise ValueError(f"{op_name}: op must be one of {tuple(OPS)}, got {op!r}")
    if op == "avg" and not tensor.is_floating_point():
        raise ValueError(f"{op_name}: op 'avg' needs a float dtype, got {tensor.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {BACKENDS}, got {backend!r}")
    if tensor.is_cuda:
        raise ValueError(f"{op_name}: CUDA tensors need the NCCL transport, which this build does not have yet")
    if not tensor.is_cpu:
        raise ValueError(f"{op_name}: tensor must be on CPU, got {tensor.device}")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None, *, backend: str = "auto") -> torch.Tensor:
    """Reduce ``tensor`` across the ranks of ``group``, in place; returns it."""
    _check("all_reduce", tensor, op, backend)
    get_communicator(group, backend).run(ALL_REDUCE, tensor.view(-1), op)
    return tensor


def reduce_scatter(tensor: torch.Tensor, op: str = "sum", group=None, *, backend: str = "auto") -> torch.Tensor:
    """``tensor`` [N * n, ...] on every rank -> this rank's reduced n-element chunk (a new
    tensor of shape [n] flattened). ``tensor`` is used as scratch."""
    _check("reduce_scatter", tensor, op, backend)
    comm = get_communicator(group, backend)
    if tensor.numel() % comm.world:
        raise ValueError(f"reduce_scatter: numel ({tensor.numel()}) must be a multiple of the group size ({comm.world})")
    flat = tensor.view(-1)
    comm.run(REDUCE_SCATTER, flat, op)
    n = flat.numel() // comm.world
    return flat[comm.rank * n : (comm.rank + 1) * n].clone()


def all_gather(tensor: torch.Tensor, group=None, *, backend: str = "auto") -> torch.Tensor:
    """``tensor`` [n] (any shape, flattened) on every rank -> [N * n]: rank c's at chunk c."""
    _check("all_gather", tensor, "sum", backend)
    comm = get_communicator(group, backend)
    n = tensor.numel()
    out = torch.empty(comm.world * n, dtype=tensor.dtype)
    out[comm.rank * n : (comm.rank + 1) * n] = tensor.view(-1)
    comm.run(ALL_GATHER, out, "sum")
    return out


def backend_for(tensor: torch.Tensor | None = None, group=None) -> str:
    """The transport ``backend="auto"`` picks for this tensor and group (a collective call
    the first time for a group: every rank must make it)."""
    if tensor is not None and tensor.is_cuda:
        return "nccl (not built)"
    return get_communicator(group, "auto").backend


def ddp_comm_hook(state, bucket):
    """``DistributedDataParallel.register_comm_hook(group_or_None, ddp_comm_hook)``:
    averages each gradient bucket with the ring (``state`` is the process group or None)."""
    grads = bucket.buffer()
    all_reduce(grads, "avg", state)
    fut = torch.futures.Future()
    fut.set_result(grads)
    return fut


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    unless torch.distributed is initialized already; returns (rank, world size)."""
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"ringfuse.distributed.init: {', '.join(missing)} not set; start the program with "
                               "torchrun (e.g. torchrun --nproc-per-node 2 prog.py)")  # fmt: skip
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
