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
  AVX2 combine. The segment name travels through the group's store and names its creator
  (pid and start time); every rank unlinks it once all have attached or when it gives up,
  and each new segment's creator first unlinks those whose creator has died (see
  ``ShmTransport``), so /dev/shm is left clean even when a rank is SIGKILLed.
- ``"torch"``: torch.distributed send/recv (gloo or nccl) on the group, the same schedule
  driven from Python: works across hosts.
- ``"nccl"``: CUDA tensors (when ``_C`` was built with CUDA): NCCL point-to-point on a
  communicator of ringfuse's own (csrc/cuda/allreduce.cu: ncclSend / ncclRecv groups on a
  side stream, a CUDA combine kernel on the tensor's stream, pipelined pieces), whose
  ncclUniqueId travels through the group's store. libnccl.so.2 is loaded at run time from the
  ``nvidia-nccl-cu13`` wheel (``pip install 'ringfuse[cuda]'``; torch's CUDA wheels bring an
  nvidia-nccl wheel too), else from the loader's path; ``RINGFUSE_NCCL_LIB`` overrides. One
  communicator per (group, device). A call returns once the ring has finished on the device
  (that is how it enforces the timeout); work queued on the tensor's stream before it comes
  first. Closing NCCL communicators (``destroy()``) is collective, like torch's
  ``destroy_process_group``.
- ``"auto"``: shm when every rank of the group runs on this host and the tensor is on CPU,
  nccl for CUDA tensors, else torch.

torch.distributed stays the control plane (process groups, stores, torchrun's
environment); ringfuse's ring is the data plane. A peer that dies or stops answering makes
every other rank raise ``RingTimeoutError`` within the communicator's timeout (during the
communicator's set-up on the first call too); ranks that pass different sizes, dtypes or ops
get ``RingMismatchError`` before any data moves, and the communicator stays usable.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import numbers
import os
import re
import signal
import socket
import time
import uuid

import torch
import torch.distributed as dist

from .. import _C
from ..ops import native

OPS = {"sum": 0, "avg": 1, "max": 2, "min": 3}
# the dtypes the rings reduce, with their codes (the handshake compares them across ranks)
DTYPE_CODE = {d: native.DTYPE_CODE[d] for d in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64)}
ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER = 0, 1, 2
KIND_NAME = {ALL_REDUCE: "all_reduce", REDUCE_SCATTER: "reduce_scatter", ALL_GATHER: "all_gather"}
BACKENDS = ("auto", "shm", "torch", "nccl")
DEFAULT_TIMEOUT_S = 60.0
# set_timeout's range: below 0.1 s a loaded host times out ordinary calls; past a day a dead
# peer is never reported (and the C++ / timedelta conversions stay far from overflow)
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 0.1, 86400.0
SHM_MAX_WORLD = 64  # the shared-memory ring's largest group (csrc/cpu/allreduce.cpp)
SHM_SLOT_BYTES = 1 << 20  # one of the two double-buffer slots per rank
NCCL_PIECE_BYTES = 4 << 20  # reduce-scatter pipelining piece (and staging slot) of the NCCL ring


class RingTimeoutError(RuntimeError):
    """A peer died or did not answer within the communicator's timeout. The communicator
    is unusable afterwards (its peers may be mid-call): build a new group."""


class RingMismatchError(ValueError):
    """Ranks called the same collective with different sizes, dtypes or ops. Found before
    any data moves, on every rank: the communicator stays usable."""


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
    # the divisor lives on the chunk's device: CUDA divides by a CPU scalar as a multiply by
    # its reciprocal, which is not the IEEE division the other transports do
    w = torch.tensor(float(world), device=chunk.device)
    if chunk.dtype in (torch.float16, torch.bfloat16):
        chunk.copy_((chunk.float() / w).to(chunk.dtype))
    else:
        chunk.div_(w)


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
            scratch = torch.empty(max(e - b for b, e in bounds), dtype=flat.dtype, device=flat.device)
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


# Shared-memory segments are named /ringfuse-<pid>-<start time>-<pid namespace>-<random>:
# the creator's pid and start time (clock ticks after boot; the pair names one process, as
# pids are reused) let any process on the host tell whether the creator still runs.
_SEGMENT = re.compile(r"ringfuse-(\d+)-(?:(\d+)-(\d+)-)?[0-9a-f]+")  # (no start / namespace: older names)


def _proc_start(pid: int) -> int | None:
    """Start time of process ``pid`` from /proc, or None once it has exited (zombies too)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold ')'
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _segment_name() -> str:
    pid = os.getpid()
    return f"/ringfuse-{pid}-{_proc_start(pid) or 0}-{_pid_ns()}-{uuid.uuid4().hex[:12]}"


def _creator_alive(name: str) -> bool:
    """Whether the process that created segment ``name`` still runs; True when this process
    cannot tell (a foreign name, start time unknown, another pid namespace)."""
    m = _SEGMENT.fullmatch(name.lstrip("/"))
    if m is None:
        return True
    if m[2] is None:  # an older ringfuse's name: the pid alone
        return _proc_start(int(m[1])) is not None
    if m[2] == "0" or m[3] == "0" or int(m[3]) != _pid_ns():
        return True
    return _proc_start(int(m[1])) == int(m[2])


def _sweep_dead_segments() -> None:
    """Unlink every ringfuse segment whose creator has exited: one killed after creating its
    segment and before a peer learnt the name (the name's only other copy was in the store,
    which usually dies with rank 0) is unlinked here, on the host's next creation."""
    try:
        entries = os.listdir("/dev/shm")
    except OSError:
        return
    for entry in entries:
        if entry.startswith("ringfuse-") and not _creator_alive(entry):
            try:
                native.shm_ring_unlink(entry)
            except ValueError:  # another user's (EPERM): theirs to sweep
                pass


def _test_die(point: str) -> None:
    """Test hook (tests/distributed): the creator SIGKILLs itself at ``point`` of set-up."""
    if os.environ.get("RINGFUSE_TEST_SHM_DIE") == point:
        os.kill(os.getpid(), signal.SIGKILL)


class ShmTransport:
    """The ring in C++ over one POSIX shared-memory segment (processes on one host).

    Set-up: rank 0 unlinks the segments of dead creators, creates its own and publishes the
    name in the store; the others attach; every rank waits until all have attached (or the
    timeout, or the creator's death), then unlinks the name. So the name outlives the set-up
    only when the creator dies before any survivor read it, and the next creation on the
    host removes it."""

    name = "shm"

    def __init__(self, group, rank: int, world: int, timeout_s: float, store, slot_bytes: int = SHM_SLOT_BYTES):
        self.rank, self.world, self.timeout_ms = rank, world, int(timeout_s * 1000)
        self.handle = name = None
        key = f"ringfuse/shm/{_next_id(group, 'segment')}"
        try:
            if rank == 0:
                _sweep_dead_segments()
                name = _segment_name()
                self.handle = native.shm_ring_open(name, 0, world, True, slot_bytes)
                _test_die("created")
                with _store_errors("rank 0 publishing its shared-memory segment", timeout_s):
                    store.set(key + "/name", name)
                _test_die("published")
            else:
                with _store_errors(f"rank {rank} waiting for rank 0's shared-memory segment", timeout_s):
                    store.wait([key + "/name"], datetime.timedelta(seconds=timeout_s))
                    name = store.get(key + "/name").decode()
                try:
                    self.handle = native.shm_ring_open(name, rank, world, False, slot_bytes)
                except ValueError as e:
                    if _creator_alive(name) and os.path.exists("/dev/shm" + name):
                        raise
                    raise RingTimeoutError(f"ringfuse.distributed: rank {rank} could not attach to {name}: its "
                                           f"creator (rank 0) died or gave up waiting ({e})") from e  # fmt: skip
            with _store_errors(f"rank {rank} attaching to the shared-memory segment", timeout_s):
                store.add(key + "/attached", 1)
            pid = name.split("-")[1]
            creator_gone = None if rank == 0 else (
                lambda: None if _creator_alive(name) else f"rank 0 (pid {pid}), the segment's creator, died")
            _wait_counter(store, key + "/attached", world, timeout_s, dead=creator_gone)
        except BaseException:
            self.close()
            raise
        finally:
            if name is not None:  # all attached, or this rank gives up (the group is broken then)
                native.shm_ring_unlink(name)

    def handshake(self, desc):
        return None  # the C++ ring compares every rank's call before moving data

    def run(self, kind: int, flat: torch.Tensor, op: str) -> None:
        status = native.shm_ring_run(self.handle, kind, flat, OPS[op], self.timeout_ms, 1)
        if status == 0:
            return
        detail = native.shm_ring_last_error(self.handle)
        if status == 3:
            raise RingMismatchError(f"ringfuse.distributed: ranks disagree on the call: {detail}")
        raise RingTimeoutError(f"ringfuse.distributed: shared-memory ring failed on rank {self.rank}: {detail}")

    def close(self) -> None:
        if self.handle is not None:
            native.shm_ring_close(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown or a call still running: the OS unmaps it
            pass


def nccl_built() -> bool:
    """Whether ``_C`` has the NCCL ring (it is built whenever the CUDA kernels are)."""
    return hasattr(_C, "nccl_ring_run")


def nccl_library_path() -> str:
    """The libnccl.so.2 the NCCL transport loads: ``RINGFUSE_NCCL_LIB`` if set, else the
    ``nvidia-nccl-cu13`` wheel's (any ``nvidia.nccl`` package's) lib/libnccl.so.2, else the
    bare name for the dynamic loader's search path."""
    env = os.environ.get("RINGFUSE_NCCL_LIB")
    if env:
        return env
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        spec = None
    for base in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(base, "lib", "libnccl.so.2")
        if os.path.isfile(path):
            return path
    return "libnccl.so.2"


_nccl_version: int | None = None


def nccl_version() -> int:
    """Load libnccl.so.2 (once per process) and return its version code (2.32.3 -> 23203)."""
    global _nccl_version
    if _nccl_version is None:
        if not nccl_built():
            raise RuntimeError("ringfuse.distributed: the NCCL transport is not built (ringfuse._C was built "
                               "without CUDA)")  # fmt: skip
        path = nccl_library_path()
        try:
            _nccl_version = native.nccl_load(path)
        except ValueError as e:
            raise RuntimeError(f"ringfuse.distributed: the NCCL transport needs libnccl.so.2 ({e}); install it "
                               "with pip install 'ringfuse[cuda]' (the nvidia-nccl-cu13 wheel), set "
                               "RINGFUSE_NCCL_LIB to its path, or pass backend='torch'") from e  # fmt: skip
    return _nccl_version


class NcclTransport:
    """The ring in C++/CUDA over NCCL point-to-point (CUDA tensors, one device per rank)."""

    name = "nccl"

    def __init__(self, group, rank: int, world: int, timeout_s: float, store, device: torch.device,
                 piece_bytes: int | None = None):  # fmt: skip
        self.rank, self.world, self.device = rank, world, device
        self.timeout_s, self.timeout_ms = timeout_s, int(timeout_s * 1000)
        self.store, self.handle, self.calls = store, None, 0
        self.failed = False  # a call failed: peers may be gone, so close aborts
        nccl_version()
        self.key = f"ringfuse/nccl/{_next_id(group, 'nccl')}"
        try:
            if rank == 0:
                store.set(self.key + "/id", native.nccl_unique_id())
            store.wait([self.key + "/id"], datetime.timedelta(seconds=timeout_s))
            uid = store.get(self.key + "/id")
            # ncclCommInitRank cannot time out: start it only once every rank got here
            store.add(self.key + "/arrived", 1)
        except RuntimeError as e:  # the store's timeout, or its server (rank 0) is gone
            raise RingTimeoutError(f"ringfuse.distributed: exchanging the NCCL id failed on rank {rank}: {e}") from e
        _wait_counter(store, self.key + "/arrived", world, timeout_s, "reached the NCCL communicator's creation")
        self.handle = native.nccl_comm_open(uid, rank, world, device.index, piece_bytes or NCCL_PIECE_BYTES,
                                            self.timeout_ms)  # fmt: skip

    def handshake(self, desc):
        """Every rank's (kind, numel, dtype, op) through the store: one key per rank and call.
        A rank deletes its key of call n-2 during call n, when every rank has read it (they
        all published call n-1, so they finished reading call n-2), so the store holds at
        most two calls' keys."""
        self.calls += 1
        n = self.calls
        keys = [f"{self.key}/call/{n}/{q}" for q in range(self.world)]
        try:
            self.store.set(keys[self.rank], ",".join(str(v) for v in desc))
            self.store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
            values = self.store.multi_get(keys)
            if n > 2:
                self.store.delete_key(f"{self.key}/call/{n - 2}/{self.rank}")
        except RuntimeError as e:
            self.failed = True
            raise RingTimeoutError(f"ringfuse.distributed: the handshake of NCCL call {n} failed on rank "
                                   f"{self.rank} (a peer died or did not call within {self.timeout_s:.0f} s): "
                                   f"{e}") from e  # fmt: skip
        return [[int(v) for v in bytes(value).decode().split(",")] for value in values]

    def run(self, kind: int, flat: torch.Tensor, op: str) -> None:
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("ringfuse.distributed: the NCCL ring cannot be captured in a CUDA graph (each call "
                             "waits on the host for its completion, to enforce the timeout)")  # fmt: skip
        status = native.nccl_ring_run(self.handle, kind, flat, OPS[op], self.timeout_ms)  # on the current stream
        if status == 0:
            return
        detail = native.nccl_last_error(self.handle)
        if status == 3:
            raise RingMismatchError(f"ringfuse.distributed: ranks disagree on the call: {detail}")
        self.failed = True
        raise RingTimeoutError(f"ringfuse.distributed: NCCL ring failed on rank {self.rank}: {detail}")

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            native.nccl_comm_close(handle, self.failed)

    # no __del__: ncclCommDestroy waits for the other ranks of the node, which a garbage
    # collection or the interpreter's exit must not do; destroy() closes explicitly


def _group_key(group):
    """This process's key for a group (store keys need no group name: each group's store is
    already prefixed by it). None is the default group, so None and dist.group.WORLD share one
    key (two keys gave two communicators over the same store keys); a default group made
    again after destroy_process_group() is another object, with its own key (get_communicator
    pins the objects it keys, so an id cannot come back for a new group). "default" only
    before torch.distributed is initialized (set_timeout)."""
    group = dist.group.WORLD if group is None and dist.is_initialized() else group
    return "default" if group is None else id(group)


_counters: dict = {}


def _next_id(group, what: str) -> int:
    """A per-group counter: every rank builds its communicators in the same order, so the
    n-th one of a group has the same store keys on every rank. The default group's goes on
    across default groups made again (whose store may hold the earlier ones' keys)."""
    default = group is None or (dist.is_initialized() and group is dist.group.WORLD)
    key = ("default" if default else _group_key(group), what)
    _counters[key] = _counters.get(key, 0) + 1
    return _counters[key]


@contextlib.contextmanager
def _store_errors(what: str, timeout_s: float):
    """torch's store errors (DistStoreError: a key did not come within the timeout;
    DistNetworkError: the store's host, usually rank 0, died) as RingTimeoutError."""
    try:
        yield
    except RingTimeoutError:
        raise
    except RuntimeError as e:
        raise RingTimeoutError(f"ringfuse.distributed: {what} failed: a peer died or did not make this call within "
                               f"{timeout_s:g} s ({type(e).__name__}: {e})") from e  # fmt: skip


def _wait_counter(store, key: str, target: int, timeout_s: float, what: str = "attached to the shared-memory segment",
                  dead=None) -> None:  # fmt: skip
    """Wait until the store counter ``key`` reaches ``target``; RingTimeoutError on the
    timeout, a store error, or when ``dead()`` returns a sentence (a peer known dead)."""
    deadline = time.monotonic() + timeout_s
    with _store_errors(f"waiting until {target} ranks {what}", timeout_s):
        while (count := store.add(key, 0)) < target:
            gone = dead() if dead is not None else None
            if gone:
                raise RingTimeoutError(f"ringfuse.distributed: {gone} before {target} ranks {what}")
            if time.monotonic() > deadline:
                raise RingTimeoutError(f"ringfuse.distributed: only {count} of {target} ranks {what} "
                                       f"within {timeout_s:g} s")  # fmt: skip
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
    def __init__(self, group, backend: str, timeout_s: float, device: torch.device | None = None):
        self.group, self.timeout_s, self.device = group, timeout_s, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.broken: str | None = None
        store = _store_of(group)
        if backend == "auto":  # CPU tensors (get_communicator resolves auto for CUDA ones)
            shm = (hasattr(_C, "shm_ring_open") and self.world <= SHM_MAX_WORLD
                   and _all_on_this_host(group, store, self.world, timeout_s))  # fmt: skip
            backend = "shm" if shm else "torch"
        self.backend = backend
        if backend == "shm":
            self.transport = ShmTransport(group, self.rank, self.world, timeout_s, store)
        elif backend == "nccl":
            self.transport = NcclTransport(group, self.rank, self.world, timeout_s, store, device)
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
    me, rank = _host_id(), dist.get_rank(group)
    keys = [f"{key}/{r}" for r in range(world)]
    with _store_errors(f"rank {rank} waiting for every rank's first collective", timeout_s):
        store.set(keys[rank], me)
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
        return all(store.get(k).decode() == me for k in keys)


_communicators: dict = {}
_failed: dict = {}  # communicator key -> why its creation failed: later calls refuse at once
_timeouts: dict = {}  # group key -> seconds ("default": set for the default group before init)
_pinned: dict = {}  # group key -> the group object, held so that its id stays its own


def _check_timeout(where: str, arg: str, seconds) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"{where}: {arg} must be a number of seconds, got {type(seconds).__name__}")
    if not MIN_TIMEOUT_S <= float(seconds) <= MAX_TIMEOUT_S:  # NaN fails this too
        raise ValueError(f"{where}: {arg} must be a finite number of seconds in [{MIN_TIMEOUT_S:g}, "
                         f"{MAX_TIMEOUT_S:g}] (0.1 s to 24 h), got {seconds!r}")  # fmt: skip
    return float(seconds)


def set_timeout(seconds: float, group=None) -> None:
    """The timeout (default 60 s; 0.1 s to 24 h) of communicators created from now on for
    ``group`` (None: the default group, also when given before torch.distributed starts;
    destroy() forgets the others)."""
    key = _group_key(group)
    _timeouts[key] = _check_timeout("set_timeout", "seconds", seconds)
    if key != "default":
        _pinned[key] = dist.group.WORLD if group is None else group  # its id stays its own
    if group is None:
        _timeouts["default"] = _timeouts[key]


def _timeout_of(group) -> float:
    key = _group_key(group)
    if key in _timeouts:
        return _timeouts[key]
    default = dist.group.WORLD if dist.is_initialized() else None
    is_default = group is None or group is default
    return _timeouts.get("default", DEFAULT_TIMEOUT_S) if is_default else DEFAULT_TIMEOUT_S


def _cuda_device(device) -> torch.device | None:
    """The CUDA device (with its index) a communicator serves, or None for CPU."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def get_communicator(group=None, backend: str = "auto", device=None) -> Communicator:
    """The cached communicator of ``group`` (None: the default group) for ``backend`` and
    the tensors' ``device`` (None or CPU: CPU tensors; a CUDA device: NCCL or torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"ringfuse.distributed: backend must be one of {BACKENDS}, got {backend!r}")
    cuda = _cuda_device(device)
    if cuda is None and backend == "nccl":
        raise ValueError("ringfuse.distributed: backend 'nccl' needs a CUDA device")
    if cuda is not None and backend == "shm":
        raise ValueError("ringfuse.distributed: backend 'shm' needs CPU tensors")
    if not dist.is_initialized():
        raise RuntimeError("ringfuse.distributed: torch.distributed is not initialized; call "
                           "ringfuse.distributed.init() (reads torchrun's environment) first")  # fmt: skip
    if cuda is not None and backend == "auto":
        backend = "nccl" if nccl_built() else "torch"
    key = (_group_key(group), backend, cuda)
    comm = _communicators.get(key)
    if comm is None:
        if key in _failed:  # a retry would use other store keys than the peers: refuse, like a broken one
            raise RingTimeoutError(f"ringfuse.distributed: creating this communicator failed earlier ({_failed[key]}); "
                                   "create a new process group")  # fmt: skip
        _pinned[key[0]] = dist.group.WORLD if group is None else group
        try:
            comm = Communicator(group, backend, _timeout_of(group), cuda)
        except RingTimeoutError as e:
            _failed[key] = str(e)
            raise
        _communicators[key] = comm
    return comm


def destroy() -> None:
    """Close every cached communicator (their shared-memory mappings and NCCL communicators
    included; for NCCL every rank should call it, as NCCL's destroy waits for its peers), and
    let go of the groups they served (timeouts set for groups other than the default one are
    forgotten)."""
    comms = list(_communicators.values())
    _communicators.clear()
    _failed.clear()
    # the groups' ids are no longer held: timeouts set for them would pass to a new group
    # that gets one of those ids (the default group's, set with group=None, stays)
    for key in [k for k in _timeouts if k != "default"]:
        del _timeouts[key]
    _pinned.clear()
    error = None
    for comm in comms:
        try:
            comm.transport.close()
        except Exception as e:  # noqa: BLE001 - close the others, then report the first
            error = error or e
    if error is not None:
        raise error


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
        if not nccl_built():
            raise ValueError(f"{op_name}: CUDA tensors need the NCCL transport, which this build does not have "
                             "(ringfuse._C was built without CUDA)")  # fmt: skip
        if backend == "shm":
            raise ValueError(f"{op_name}: backend 'shm' needs CPU tensors, got {tensor.device} (use 'nccl' or 'auto')")
    elif not tensor.is_cpu:
        where = "CPU or a CUDA device" if nccl_built() else "CPU"
        raise ValueError(f"{op_name}: tensor must be on {where}, got {tensor.device}")
    elif backend == "nccl":
        raise ValueError(f"{op_name}: backend 'nccl' needs CUDA tensors, got a CPU tensor")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None, *, backend: str = "auto") -> torch.Tensor:
    """Reduce ``tensor`` across the ranks of ``group``, in place; returns it."""
    _check("all_reduce", tensor, op, backend)
    get_communicator(group, backend, tensor.device).run(ALL_REDUCE, tensor.view(-1), op)
    return tensor


def reduce_scatter(tensor: torch.Tensor, op: str = "sum", group=None, *, backend: str = "auto") -> torch.Tensor:
    """``tensor`` [N * n, ...] on every rank -> this rank's reduced n-element chunk (a new
    tensor of shape [n] flattened). ``tensor`` is used as scratch."""
    _check("reduce_scatter", tensor, op, backend)
    comm = get_communicator(group, backend, tensor.device)
    if tensor.numel() % comm.world:
        raise ValueError(f"reduce_scatter: numel ({tensor.numel()}) must be a multiple of the group size ({comm.world})")
    flat = tensor.view(-1)
    comm.run(REDUCE_SCATTER, flat, op)
    n = flat.numel() // comm.world
    return flat[comm.rank * n : (comm.rank + 1) * n].clone()


def all_gather(tensor: torch.Tensor, group=None, *, backend: str = "auto") -> torch.Tensor:
    """``tensor`` [n] (any shape, flattened) on every rank -> [N * n]: rank c's at chunk c."""
    _check("all_gather", tensor, "sum", backend)
    comm = get_communicator(group, backend, tensor.device)
    n = tensor.numel()
    out = torch.empty(comm.world * n, dtype=tensor.dtype, device=tensor.device)
    out[comm.rank * n : (comm.rank + 1) * n] = tensor.view(-1)
    comm.run(ALL_GATHER, out, "sum")
    return out


def backend_for(tensor: torch.Tensor | None = None, group=None) -> str:
    """The transport ``backend="auto"`` picks for this tensor and group (a collective call
    the first time for a group: every rank must make it)."""
    if tensor is not None and tensor.is_cuda:  # no communicator needed: auto is nccl for CUDA tensors
        return "nccl" if nccl_built() else "nccl (not built)"
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
    unless torch.distributed is initialized already; returns (rank, world size). ``timeout_s``
    (0.1 s to 24 h) is the process group's."""
    timeout_s = _check_timeout("ringfuse.distributed.init", "timeout_s", timeout_s)
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"ringfuse.distributed.init: {', '.join(missing)} not set; start the program with "
                               "torchrun (e.g. torchrun --nproc-per-node 2 prog.py)")  # fmt: skip
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
