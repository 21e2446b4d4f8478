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

Only ringfuse ``_C`` kernels are recorded. Anything else that computes (a torch op other
than allocation and views, a ``_C`` function that returns a value) raises NotCapturable,
so a sequence that cannot be replayed faithfully is never captured.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

import torch
from torch.overrides import TorchFunctionMode

from .. import _C

# ops modules whose _C calls are recorded
_MODULES = ("attention", "int8_gemm", "layer_norm", "linear", "rms_norm", "rotary_embedding", "silu_mul")
# torch functions a captured block may call (a TorchFunctionMode sees them; a
# TorchDispatchMode would import torch._dynamo, ~140 MB of RSS with triton):
_ALLOC = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
_METADATA = frozenset({"__get__", "data_ptr", "dim", "element_size", "is_contiguous", "numel", "size", "stride",
                       "promote_types", "result_type", "get_num_threads", "is_grad_enabled"})  # fmt: skip
_MAYBE_VIEW = frozenset({"contiguous", "reshape", "to", "float", "view", "detach", "t", "transpose", "permute",
                         "expand", "unsqueeze", "squeeze", "as_strided", "__getitem__"})  # refused when they copy


class NotCapturable(RuntimeError):
    """The captured code did something a replay would not repeat."""


class CpuGraph:
    """The recorded kernel calls; ``replay()`` runs them again, in order."""

    def __init__(self):
        self.calls: list[tuple] = []  # (kernel, args)
        self._keep: list[torch.Tensor] = []  # every tensor created during capture

    def replay(self) -> None:
        for fn, args in self.calls:
            fn(*args)


class _Recorder:
    """Stands in for the _C module: each kernel call of the capturing thread is run and
    recorded (other threads' calls just run)."""

    def __init__(self, calls):
        self._calls, self._thread = calls, threading.get_ident()

    def __getattr__(self, name):
        fn = getattr(_C, name)
        if not callable(fn):
            return fn

        def record(*args):
            out = fn(*args)
            if threading.get_ident() != self._thread:
                return out
            if out is not None:
                raise NotCapturable(f"_C.{name} returned a value; its caller's logic cannot be replayed")
            self._calls.append((fn, args))

        return record


class _Guard(TorchFunctionMode):
    """Refuses torch compute during capture and keeps every new tensor alive."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in _ALLOC and name not in _METADATA and name not in _MAYBE_VIEW:
            raise NotCapturable(f"torch function {name or func} ran during capture: only ringfuse kernels are replayed")
        out = func(*args, **(kwargs or {}))
        if name in _MAYBE_VIEW and isinstance(out, torch.Tensor) and out.numel() and (
                not isinstance(args[0], torch.Tensor)
                or out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()):  # fmt: skip
            raise NotCapturable(f"{name} copied its input during capture: only ringfuse kernels are replayed")
        if isinstance(out, torch.Tensor) and name not in _METADATA:
            self.keep.append(out)
        return out


@contextlib.contextmanager
def capture_cpu_graph():
    """``with capture_cpu_graph() as g: ...`` runs the block (its kernels really run) and
    records its ringfuse kernel calls in ``g``; ``g.replay()`` repeats them."""
    g = CpuGraph()
    modules = [importlib.import_module(f"{__package__}.{m}") for m in _MODULES]
    saved = [m._C for m in modules]
    recorder = _Recorder(g.calls)
    for m in modules:
        m._C = recorder
    try:
        with _Guard(g._keep):
            yield g
    finally:
        for m, real in zip(modules, saved):
            m._C = real
