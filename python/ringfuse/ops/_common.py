"""Shared plumbing of the op layer: dtype codes, argument checks, [rows, hidden] views.

Every op validates here before a pointer reaches ``ringfuse._C`` or a Triton launcher.
Errors name the argument, what was expected and what came: TypeError for a wrong type or
dtype, ValueError for a wrong value, shape or device.
"""

from __future__ import annotations

import math
import os

import torch

from .. import _C

# Keep in sync with csrc/common.h.
DTYPE_CODE = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int8: 3,
    torch.int32: 4,
    torch.int64: 5,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, plus transparent huge pages for large CPU outputs before first touch:
    the page faults of a fresh 64 MiB tensor drop from tens of ms to a few."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cpu" and out.numel() * out.element_size() >= HUGEPAGE_MIN_BYTES:
        _C.advise_hugepages(out.data_ptr(), out.numel() * out.element_size())
    return out


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


def check_eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps}")
    return eps


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
    """A per-channel parameter (weight / bias): 1-D [hidden], x's dtype or float32, x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != x.dtype and t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} dtype must be {x.dtype} (as x) or float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != hidden:
        raise ValueError(f"{op}: {name} must have shape ({hidden},) to match x's last dim, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """View t as [rows, hidden] with unit inner stride and one row stride, without copying
    when its layout allows (contiguous, or rows of a larger buffer such as x[:, :h]);
    otherwise return a contiguous copy. This is the layout rule of every norm op."""
    hidden = t.shape[-1]
    if t.is_contiguous():
        return t.view(-1, hidden)
    if t.stride(-1) == 1 or hidden == 1:
        try:
            v = t.view(-1, hidden)
            if v.stride(1) == 1 or hidden == 1:
                return v
        except RuntimeError:
            pass
    return t.contiguous().view(-1, hidden)


def row_stride(t2d: torch.Tensor) -> int:
    return t2d.stride(0) if t2d.shape[0] > 1 else t2d.shape[1]


def _span(t: torch.Tensor) -> tuple[int, int]:
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def check_out(op: str, out, shape, dtype, x: torch.Tensor, inputs: dict, name: str = "out") -> torch.Tensor:
    """An output argument (``name``) must match shape/dtype/device, have the rows layout,
    and not partly overlap an input (exactly the same tensor is allowed: in place)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"{op}: {name} is on {out.device} but x is on {x.device}")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name}= does not support autograd; pass {name}=None")
    out2d = rows_view(out) if out.numel() else out
    if out.numel() and out2d.data_ptr() != out.data_ptr():
        raise ValueError(f"{op}: {name} must have a unit inner stride and one row stride (got strides {out.stride()})")
    if out.numel():
        o0, o1 = _span(out)
        for other, t in inputs.items():
            if t is None or not t.numel():
                continue
            if t.data_ptr() == out.data_ptr() and t.stride() == out.stride():
                continue  # exactly the same memory: in place
            a0, a1 = _span(t)
            if a0 < o1 and o0 < a1:
                raise ValueError(f"{op}: {name} overlaps {other} in memory; use a separate buffer or the same tensor")
    return out2d


def residual_output(op: str, residual, residual_out, x: torch.Tensor, out: torch.Tensor):
    """The tensor that receives x + residual: residual_out when given (validated; it may be
    residual itself or x, not out), else a new contiguous tensor.
    Returns (tensor or None, its [rows, hidden] view or None)."""
    if residual is None:
        if residual_out is not None:
            raise ValueError(f"{op}: residual_out given without residual")
        return None, None
    if residual_out is None:
        new = new_output(x.shape, x.dtype, x.device)
        return new, (new.view(-1, x.shape[-1]) if x.numel() else new)
    view = check_out(op, residual_out, x.shape, x.dtype, x, {"x": x, "residual": residual}, name="residual_out")
    if residual_out.numel():
        (a0, a1), (b0, b1) = _span(residual_out), _span(out)
        if a0 < b1 and b0 < a1:
            raise ValueError(f"{op}: residual_out and out must not share memory")
    return residual_out, view


def needs_autograd(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
