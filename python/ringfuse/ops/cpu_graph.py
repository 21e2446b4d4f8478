"""CPU graphs: record the kernel calls that a fixed sequence of ringfuse ops makes on fixed
buffers, then replay them without the Python around them (CUDA graphs' idea, on the CPU).

A decode step at batch 1 spends ~10 us per kernel but several us per op in Python (checks,
allocation, argument marshalling); replaying the recorded calls leaves ~1 us per kernel.
The same rules as CUDA graphs hold: replay reads and writes the buffers that existed during
capture (the graph keeps every tensor created while capturing alive), so new inputs are
copied into the captured input tensors first, and outputs are read from the captured ones.
Everything that decides which kernels run (shapes, dtypes, the thread count) is fixed at
capture; the values in the buffers (token positions, slots, block tables) are not, and the
C++ kernels still check those on every replay.

Only ringfuse ``_C`` kernels called from the capturing thread are recorded (every ``_C``
function is swapped for a recording one for the capture; the ops and ringfuse.distributed
reach ``_C`` through ops/native.py, which looks each function up at every call, so they
all go through it). Anything else raises NotCapturable, so a sequence that cannot be replayed faithfully
is never captured: a torch op other than allocation, metadata and views that do not copy; a
``_C`` function that returns a value (its caller decides with it; the all-reduce's status
is one); indexing with a tensor; any tensor off the CPU (Triton launches are not recorded).
Objects made before the capture that hold private copies (a PagedDecodePlan converts int32
positions to int64) must be made inside it, where such a copy is refused.

Replay first checks that no storage the graph touches has moved (resize_, share_memory_):
one data_ptr() per storage, ~0.3 us each once a step's weight stream has pushed them out
of cache. So the buffers the block allocates come from a few 1 MiB arena chunks of the
graph (one storage each, instead of one per intermediate), and ``static`` tensors (a
model's weights and KV cache, which their owner never resizes) are held but not checked:
a decode step of SmolLM2 went from 551 checked storages to ~10.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

from .. import _C

# torch functions a captured block may call (a TorchFunctionMode sees them; a
# TorchDispatchMode would import torch._dynamo, ~140 MB of RSS with triton):
_ALLOC = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
_METADATA = frozenset({"__get__", "data_ptr", "dim", "element_size", "is_contiguous", "numel", "size", "stride",
                       "promote_types", "result_type", "get_num_threads", "is_grad_enabled", "is_inference",
                       "untyped_storage"})  # fmt: skip
_MAYBE_VIEW = frozenset({"contiguous", "reshape", "to", "float", "view", "detach", "t", "transpose", "permute",
                         "expand", "unsqueeze", "squeeze", "as_strided", "__getitem__"})  # refused when they copy


class NotCapturable(RuntimeError):
    """The captured code did something a replay would not repeat."""


class CaptureBusy(NotCapturable):
    """Another thread's capture did not end within the wait: this step was not captured, a
    later one may be."""


# One capture at a time in the process (the _C functions are swapped for the duration): a
# second thread waits for the first to end, the same thread nesting one is refused.
_capture_lock = threading.Lock()
_capture_thread: int | None = None
_CAPTURE_WAIT_S = 60.0


_CHUNK_BYTES = 1 << 20  # arena chunk; a buffer of more than a quarter of it keeps its own storage


class CpuGraph:
    """The recorded kernel calls; ``replay()`` runs them again, in order."""

    def __init__(self, static=()):
        self.calls: list[tuple] = []  # (kernel, args)
        self._keep: list[torch.Tensor] = []  # every tensor created during capture
        # the storage of every tensor whose data pointer was read during capture (inputs and
        # weights made before it included), held so that none is freed while the graph lives,
        # with the address it had: replay refuses a storage that moved (resize_, share_memory_).
        # A tensor rebound to other memory (set_, .data =) is not seen: the graph goes on with
        # the memory it captured, as a CUDA graph does
        self._storages: dict[int, torch.UntypedStorage] = {}  # data pointer at capture -> storage
        self._static: dict[int, torch.UntypedStorage] = {}  # held, not checked: the caller's promise
        for t in static:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"capture_cpu_graph: static must be an iterable of tensors, got a {type(t).__name__}")
            s = t.untyped_storage()
            self._static.setdefault(s.data_ptr(), s)
        self._chunk: torch.UntypedStorage | None = None  # the arena chunk being filled
        self._chunk_used = 0

    def _hold(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        p = s.data_ptr()
        if p not in self._static:
            self._storages.setdefault(p, s)

    def _in_arena(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor like the new buffer t (sizes, strides, dtype) placed in an arena chunk, at a
        64-byte boundary; t itself where it is large."""
        nbytes = t.untyped_storage().nbytes()
        if nbytes > _CHUNK_BYTES // 4:
            return t
        offset = -(-self._chunk_used // 64) * 64
        if self._chunk is None or offset + nbytes > _CHUNK_BYTES:
            self._chunk, offset = torch.empty(_CHUNK_BYTES, dtype=torch.uint8).untyped_storage(), 0
        self._chunk_used = offset + nbytes
        return torch.empty(0, dtype=t.dtype).set_(self._chunk, offset // t.element_size(), t.size(), t.stride())

    def replay(self) -> None:
        # one list of pointers compared at C speed (~10 storages for a decode step: see above)
        if [s.data_ptr() for s in self._storages.values()] != list(self._storages):
            raise RuntimeError("CpuGraph.replay: a tensor the graph reads or writes was resized or moved to "
                               "new memory since the capture (resize_, share_memory_): capture the graph again")  # fmt: skip
        for fn, args in self.calls:
            fn(*args)


# _C functions that only advise or answer a question about sizes: they run during capture
# and are not replayed (their result does not depend on the buffers' values)
_NOT_RECORDED = frozenset({"advise_hugepages", "int8_packed_size", "isa", "build_info"})
# _C functions that change process-wide state: a replay would change it again, behind the caller's back
_REFUSED = {"set_isa": "changes the process-wide ISA choice: call it before the capture"}


def _wrap(fn, name, calls, thread):
    def record(*args):
        if name in _REFUSED and threading.get_ident() == thread:
            raise NotCapturable(f"_C.{name} {_REFUSED[name]}")
        out = fn(*args)
        if threading.get_ident() != thread or name in _NOT_RECORDED:  # just run
            return out
        if out is not None:
            raise NotCapturable(f"_C.{name} returned a value; its caller's logic cannot be replayed")
        calls.append((fn, args))

    record._ringfuse_recording = True
    return record


class _Guard(TorchFunctionMode):
    """Refuses torch compute (and any tensor off the CPU) during capture; keeps every new
    tensor alive."""

    def __init__(self, graph):
        super().__init__()
        self.keep = graph._keep
        self.graph = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in _ALLOC and name not in _METADATA and name not in _MAYBE_VIEW:
            raise NotCapturable(f"torch function {name or func} ran during capture: only ringfuse kernels are replayed")
        flat = [*args, *(kwargs or {}).values()]
        flat += [i for a in flat if isinstance(a, (tuple, list)) for i in a]
        if name != "__get__" and any(isinstance(a, torch.Tensor) and not a.is_cpu for a in flat):
            raise NotCapturable(f"{name} on a non-CPU tensor during capture: CPU graphs record CPU kernels only")
        if name == "__getitem__" and any(isinstance(a, torch.Tensor) for a in flat[1:]):
            raise NotCapturable("indexing with a tensor during capture: the row it picks would be fixed at capture")
        out = func(*args, **(kwargs or {}))
        if (name in _ALLOC and isinstance(out, torch.Tensor) and out.is_cpu and out.numel()
                and out.layout == torch.strided and not out.requires_grad and not out.is_pinned()
                and "out" not in (kwargs or {})):  # fmt: skip
            out = self.graph._in_arena(out)  # a new buffer: one of the graph's chunks instead
        if name == "data_ptr" and isinstance(args[0], torch.Tensor):  # a pointer a kernel may be given
            self.graph._hold(args[0])
        if name in _MAYBE_VIEW and isinstance(out, torch.Tensor) and out.numel() and (
                not isinstance(args[0], torch.Tensor)
                or out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()):  # fmt: skip
            raise NotCapturable(f"{name} copied its input during capture: only ringfuse kernels are replayed")
        if isinstance(out, torch.Tensor) and name not in _METADATA:
            self.keep.append(out)
        return out


@contextlib.contextmanager
def capture_cpu_graph(static=()):
    """``with capture_cpu_graph() as g: ...`` runs the block (its kernels really run) and
    records the ringfuse kernel calls it makes from this thread in ``g``; ``g.replay()``
    repeats them. Captures do not nest. ``static``: tensors that the caller never resizes
    or moves to shared memory while the graph lives (weights, a KV cache): the graph holds
    them but does not re-check their addresses on every replay. Captures do not overlap: one
    started while another thread captures waits for it (CaptureBusy after a minute)."""
    global _capture_thread
    thread = threading.get_ident()
    if _capture_thread == thread:
        raise NotCapturable("a CPU graph capture is already in progress in this thread (captures do not nest)")
    g = CpuGraph(static)
    if not _capture_lock.acquire(timeout=_CAPTURE_WAIT_S):
        raise CaptureBusy(f"another thread's CPU graph capture did not end within {_CAPTURE_WAIT_S:g} s")
    try:
        _capture_thread = thread
        names = [n for n in dir(_C) if not n.startswith("_") and callable(getattr(_C, n))]
        real = {n: getattr(_C, n) for n in names}  # no wrapper among them: the lock is ours
        for n, fn in real.items():  # ops.native looks these up at each call
            setattr(_C, n, _wrap(fn, n, g.calls, thread))
        try:
            with _Guard(g):
                yield g
        finally:
            for n, fn in real.items():
                setattr(_C, n, fn)
    finally:
        _capture_thread = None
        _capture_lock.release()
