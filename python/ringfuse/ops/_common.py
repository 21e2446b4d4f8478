"""Shared plumbing of the op layer: dtype codes, argument checks, [rows, hidden] views.

Every op validates here before a tensor reaches the ``_C`` wrappers (ops/native.py) or a
Triton launcher.
Errors name the argument, what was expected and what came: TypeError for a wrong type or
dtype, ValueError for a wrong value, shape or device.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import NamedTuple

import torch

from .. import _C
from . import native

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_SET = frozenset(FLOAT_DTYPES)

CUDA_BACKENDS = ("triton", "cuda")
_cuda_backend = os.environ.get("RINGFUSE_CUDA_BACKEND", "triton")


def set_cuda_backend(name: str) -> None:
    """Choose what runs ops on CUDA tensors: "triton" (default) or "cuda" (the CUDA C++
    kernels in ``_C``, when built)."""
    global _cuda_backend
    if name not in CUDA_BACKENDS:
        raise ValueError(f"cuda backend must be one of {CUDA_BACKENDS}, got {name!r}")
    if name == "cuda" and not hasattr(_C, "rms_norm_cuda"):
        raise ValueError("cuda backend 'cuda' requested but ringfuse._C was built without CUDA")
    _cuda_backend = name


def cuda_backend() -> str:
    return _cuda_backend


HUGEPAGE_MIN_BYTES = 4 << 20


def new_output(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new contiguous tensor shaped like x, plus transparent huge pages for large CPU
    outputs before first touch: the page faults of a fresh 64 MiB tensor drop from tens of
    ms to a few. (empty_like is the cheapest allocation call: ~0.7 us vs ~1.7 us.)"""
    dtype = dtype or x.dtype
    if x.is_contiguous():
        out = torch.empty_like(x, dtype=dtype)
    else:
        out = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
    if out.is_cpu and out.numel() * out.element_size() >= HUGEPAGE_MIN_BYTES:
        native.advise_hugepages(out)
    return out


# Inference tensors (made under torch.inference_mode) have no version counter: a Watch
# compares a watched source of up to this many elements by value at each call (~1 us at 576
# elements, ~2.5 us at 4K, ~8 us at 16K: a bias, scales, norm weights, positions), and a
# larger one (a weight) only by its data pointer.
WATCH_BY_VALUE_MAX = 1 << 14


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as uint8 (NaN compares equal to itself); t itself where no such view exists."""
    try:
        return t.reshape(-1).view(torch.uint8)
    except RuntimeError:
        return t


class Watch:
    """For objects that cache pointers into tensors or private copies of them (prepared
    ops, packed weights, decode plans): ``changed()`` says whether any of the caller's
    ``sources`` was swapped, resized or written in place, or one of the ``copies`` the kernels
    read instead was swapped or resized, since the watch was made. The storages seen then are
    held, so their memory cannot be freed and handed to a new tensor at the same address
    (which a pointer comparison alone would take for the old one). In-place writes to a large
    inference tensor go unseen (WATCH_BY_VALUE_MAX)."""

    __slots__ = ("tensors", "_versioned", "stamp", "_held", "_values")

    def __init__(self, sources, copies=()):
        sources = tuple(sources)
        # a copy that is one of the sources (nothing was copied) is watched once, as a source
        self.tensors = sources + tuple(t for t in copies if t is not None and not any(t is s for s in sources))
        # reading an inference tensor's _version raises (and an exception costs ~8 us)
        versioned = tuple(t for t in self.tensors if not t.is_inference())
        self._versioned = self.tensors if len(versioned) == len(self.tensors) else versioned
        self.stamp = self._stamp()
        self._held = tuple(t.untyped_storage() for t in self.tensors)
        self._values = tuple((t, t.clone()) for t in sources if t.is_inference() and t.numel() <= WATCH_BY_VALUE_MAX)

    def _stamp(self) -> tuple:
        """Data pointers (a tensor swapped: ``t.data = ...``, ``set_``, ``resize_``) and version
        counters (written in place)."""
        if self._versioned is self.tensors:  # the usual case, in one pass (~0.1 us per tensor)
            return tuple((t.data_ptr(), t._version) for t in self.tensors)
        return tuple(t.data_ptr() for t in self.tensors), tuple(t._version for t in self._versioned)

    def changed(self) -> bool:
        if self._stamp() != self.stamp:
            return True
        for t, seen in self._values:  # empty unless inference tensors are watched
            if not torch.equal(t, seen) and not torch.equal(_bytes(t), _bytes(seen)):  # bytes: NaN is no change
                return True
        return False


class DeviceValueError(ValueError):
    """A CUDA kernel met out-of-range index values (seq_lens, block ids, slots, positions,
    cu_seqlens) and left out what they pointed at, or quantize_per_token met inf / NaN: see
    ``check_device_errors``."""


# RINGFUSE_SYNC_CHECKS=1: every CUDA op with device-checked values reports right after its
# launch (a sync per op: for finding which call went wrong, not for speed)
SYNC_CHECKS = os.environ.get("RINGFUSE_SYNC_CHECKS", "0") not in ("", "0")


def check_device_errors(device=None) -> None:
    """Raises DeviceValueError when a CUDA kernel on ``device`` (every device if None) met
    out-of-range index values (or quantize_per_token inf / NaN) since the last check, and
    clears the flag. The CUDA paths of the attention, write_kv, rotary and quantize ops
    check those values inside their kernels, not on
    the host (which would be a sync per call and would break CUDA-graph capture): a row
    with a bad value is zeroed or skipped and a per-device flag is raised
    (kernels/device_errors.py). Reading the flag is a sync: call this where you sync
    anyway (the runtime does after each step). Nothing to do when no kernel ran."""
    flags = sys.modules.get("ringfuse.kernels.device_errors")  # not imported: no kernel ran (and no triton import)
    bits = flags.take(device) if flags is not None else 0
    if bits:
        raise DeviceValueError("a CUDA kernel met bad index values since the last check_device_errors(): "
                               + "; ".join(flags.describe(bits)))  # fmt: skip


def after_launch(device) -> None:
    """Called by the CUDA paths after launching a device-checked kernel."""
    if SYNC_CHECKS:
        check_device_errors(device)


def num_threads() -> int:
    """Threads for CPU kernels: the same count torch uses (torch.set_num_threads)."""
    return torch.get_num_threads()


def check_float_tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} must be on a cpu or cuda device, got {t.device}")


# Kernels add eps in fp32: it must be a normal fp32 number.
_F32_MIN_NORMAL, _F32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def check_eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps}")
    if not (_F32_MIN_NORMAL <= value <= _F32_MAX):
        raise ValueError(f"{op}: eps must be representable in float32 (1.2e-38 .. 3.4e38), got {eps}")
    return value


def plain_call(x, eps, residual=None, *params) -> bool:
    """Whether a norm-style call is the common case that every check of the op would accept
    with nothing to convert: x a non-empty contiguous float tensor on the CPU or a CUDA
    device; eps a float the kernels take; residual (if any) a contiguous tensor of x's shape,
    dtype and device; each param None or a contiguous 1-D tensor [hidden] of x's dtype and
    device. The op then skips its checks (about 10 us of Python against a 0.6 us CPU kernel
    call, or a few us of GPU work, at decode sizes); anything else takes the full checks,
    which accept it or say what is wrong."""
    if not (isinstance(x, torch.Tensor) and x.dtype in _FLOAT_SET and x.is_contiguous() and x.dim() and x.numel()
            and type(eps) is float and _F32_MIN_NORMAL <= eps <= _F32_MAX):  # fmt: skip
        return False
    cpu = x.is_cpu
    if not (cpu or x.is_cuda):
        return False
    device = None if cpu else x.device
    if residual is not None and not (isinstance(residual, torch.Tensor) and residual.dtype is x.dtype
                                     and residual.shape == x.shape and residual.is_contiguous()
                                     and (residual.is_cpu if cpu else residual.device == device)):  # fmt: skip
        return False
    param_shape = x.shape[-1:]
    for p in params:
        if p is not None and not (isinstance(p, torch.Tensor) and p.dtype is x.dtype and p.shape == param_shape
                                  and p.is_contiguous() and (p.is_cpu if cpu else p.device == device)):  # fmt: skip
            return False
    return True


def plain_outputs(x: torch.Tensor, outputs: tuple, inputs: tuple, params: tuple) -> bool:
    """Whether the ``out=`` tensors (None: not given) of a plain_call are the common case
    that check_out and residual_output accept with nothing to say: contiguous tensors of
    x's shape, dtype and device, no autograd involved, disjoint from each other, and each
    either exactly one of ``inputs`` (tensors of x's shape: in place) or disjoint from every
    input and param. The op then skips those checks (~10 us of Python per call); anything
    else takes them, which accept it or say what is wrong."""
    if torch.is_grad_enabled():
        for t in (*outputs, *inputs, *params):
            if t is not None and t.requires_grad:
                return False
    cpu = x.is_cpu
    device = None if cpu else x.device
    nbytes = x.nbytes
    written = []
    for out in outputs:
        if out is None:
            continue
        if not (isinstance(out, torch.Tensor) and out.dtype is x.dtype and out.shape == x.shape and out.is_contiguous()
                and (out.is_cpu if cpu else out.device == device)):  # fmt: skip
            return False
        start = out.data_ptr()
        for other in written:
            if start < other + nbytes and other < start + nbytes:
                return False
        for t in inputs:
            if t is not None and (other := t.data_ptr()) != start and start < other + nbytes and other < start + nbytes:
                return False
        for t in params:
            if t is not None and start < (other := t.data_ptr()) + t.nbytes and other < start + nbytes:
                return False
        written.append(start)
    return True


def new_rows_output(x: torch.Tensor) -> torch.Tensor:
    """new_output for a contiguous x (plain_call's case), without re-checking that."""
    out = torch.empty_like(x)
    if x.is_cpu and x.numel() * x.element_size() >= HUGEPAGE_MIN_BYTES:
        native.advise_hugepages(out)
    return out


def check_like(op: str, name: str, t, ref: torch.Tensor, ref_name: str = "x") -> None:
    """t must be a tensor with ref's shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(
            f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
        )
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_param(op: str, name: str, t, x: torch.Tensor, hidden: int) -> None:
    """A per-channel parameter (weight / bias): 1-D [hidden], a float dtype, x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must have dtype float32, float16 or bfloat16; got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != hidden:
        raise ValueError(f"{op}: {name} must have shape ({hidden},) to match x's last dim, got {tuple(t.shape)}")
    if not (x.is_cpu and t.is_cpu) and t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


class Rows(NamedTuple):
    """A tensor presented as [n_rows, hidden]: ``t.data_ptr()`` is row 0, rows are
    ``stride`` elements apart, elements within a row are contiguous."""

    t: torch.Tensor
    stride: int

    def as_2d(self, n_rows: int, hidden: int) -> torch.Tensor:
        """The strided [n_rows, hidden] view, for launchers that take tensors (Triton)."""
        return self.t.as_strided((n_rows, hidden), (self.stride, 1))


NO_ROWS = (None, 0)  # an absent optional tensor, as the norm kernels' (tensor, row stride) arguments take it


def kernel_param(t, x: torch.Tensor):
    """A checked weight / bias as the kernels take it: contiguous, in x's dtype or fp32
    (another float dtype is upcast to fp32, which is what torch's fp32 math does with it)."""
    if t is None:
        return None
    if t.dtype != x.dtype and t.dtype != torch.float32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


def rows(t: torch.Tensor) -> Rows:
    """Present t as [n_rows, hidden] without copying when its layout allows (contiguous,
    or evenly strided rows with a unit inner stride such as ``big[:, :h]``); otherwise copy
    it to a contiguous tensor. This is the layout rule of every norm op."""
    hidden = t.shape[-1]
    if t.is_contiguous():
        return Rows(t, hidden)
    if t.stride(-1) == 1 or hidden == 1:
        try:
            v = t.view(-1, hidden)
            if v.shape[0] <= 1:
                return Rows(v, hidden)
            if v.stride(0) >= hidden:  # rows must not overlap (expand, as_strided): else copy
                return Rows(v, v.stride(0))
        except RuntimeError:  # leading dims do not collapse into one stride
            pass
    return Rows(t.contiguous(), hidden)


def span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] that t's elements occupy (t non-empty)."""
    start = t.data_ptr()
    if t.is_contiguous():  # the common case, without a Python loop over the dims
        return start, start + t.nbytes
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    return spans_overlap(span(a), span(b))


def spans_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def rows_overlap(t: torch.Tensor) -> bool:
    """Whether two rows (last dim, unit stride) of t could share memory, as in an expanded
    tensor: a kernel writing t in place would then write some elements twice. The outer dims
    are nested by stride; each must step past everything the inner ones span (a sufficient
    test for views that do not interleave, which is every layout torch makes but as_strided)."""
    extent = t.shape[-1]
    for st, n in sorted((st, n) for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
        if st < extent:
            return True
        extent += st * (n - 1)
    return False


def check_out(op: str, out, shape, dtype, x: torch.Tensor, inputs: dict, name: str = "out") -> Rows:
    """An output argument (``name``) must match shape/dtype/device, have the rows layout
    (no copy possible), and not partly overlap an input (being exactly an input is allowed:
    in place)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"{op}: {name} is on {out.device} but x is on {x.device}")
    if needs_autograd(out, *inputs.values()):
        raise ValueError(f"{op}: {name}= does not support autograd (an input requires grad); pass {name}=None")
    if not out.numel():
        return Rows(out, shape[-1])
    out_rows = rows(out)
    if out_rows.t.data_ptr() != out.data_ptr():  # rows() had to copy
        raise ValueError(f"{op}: {name} must have a unit inner stride and one row stride (got strides {out.stride()})")
    for other, t in inputs.items():
        if t is None or not t.numel():
            continue
        if t.data_ptr() == out.data_ptr() and t.stride() == out.stride() and t.dtype == out.dtype:
            continue  # exactly the same elements: in place
        if overlap(t, out):
            raise ValueError(f"{op}: {name} overlaps {other} in memory; use a separate buffer or the same tensor")
    return out_rows


def residual_output(op: str, residual, residual_out, x: torch.Tensor, out: torch.Tensor, params: dict):
    """The tensor that receives x + residual: residual_out when given (validated; it may be
    residual itself or x, never memory shared with out), else a new contiguous tensor.
    Returns (tensor or None, its Rows or None)."""
    if residual is None:
        if residual_out is not None:
            raise ValueError(f"{op}: residual_out given without residual")
        return None, None
    if residual_out is None:
        new = new_output(x)
        return new, Rows(new, x.shape[-1])
    res_rows = check_out(op, residual_out, x.shape, x.dtype, x, {"x": x, "residual": residual, **params},
                         name="residual_out")
    if residual_out.numel() and overlap(residual_out, out):
        raise ValueError(f"{op}: residual_out and out must not share memory")
    return residual_out, res_rows


def mark_written(*tensors) -> None:
    """Bump the version counters of tensors a kernel wrote in place, as torch's own in-place
    ops do: autograd then refuses a backward through a saved tensor that was overwritten, and
    prepared objects watching a tensor see the write (~0.2 us each). Called after the kernel,
    so that a call refused by a check (in Python or in the kernel) bumps nothing."""
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def needs_autograd(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any(<generator>): this runs on every eager op call
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False
