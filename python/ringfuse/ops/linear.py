"""Float linear on CPU: ``linear(x, weight, bias=None)``, the kernels in csrc/cpu/linear.cpp.

``linear(x [..., K], weight [N, K], bias [N] = None) -> [..., N]`` computes
``x @ weight.T + bias`` like ``torch.nn.functional.linear``, with fp32 accumulation and one
rounding to x's dtype at the end. The output has x's dtype.

Kernel path (CPU tensors, no autograd): x float32 or bfloat16; weight float32 or bfloat16
(independently of x: bf16 weights with fp32 activations read half the bytes, each weight
widened to fp32 in registers); bias float32 or bfloat16 (any other float dtype is cast to
fp32). Two kernels, by the number of rows M of x:

- M <= ``ROW_KERNEL_MAX_M`` (16; decode): a bandwidth-bound kernel that reads each weight
  once for all rows (torch's MKL path streams the weights at a fraction of the DRAM
  bandwidth there), with each output's reduction order fixed, so every row of a batch gets
  the bits it gets alone;
- more rows (prefill): a compute-bound GEMM on weights packed per call into column panels
  (6 x 16 register blocks on AVX2, 12 x 32 with 16 lanes), each output summed in chunks
  of 64 k: ~2x torch's fp32 GEMM from M = 17 to 256 with 16 lanes, 1.1-1.9x on the AVX2
  path. bf16 weights are widened to fp32, so where torch's bf16 GEMM has native bf16 dot
  products (AVX-512 BF16, AMX) F.linear is faster for bf16 x bf16 past ~8 rows (0.5-0.66x
  on a Zen 5 VM; the runtime's layers use torch's there, see layers/linear.py), and 2.5-4.6x
  slower where it has not.

Either way the result is bitwise the same for any ``torch.get_num_threads()`` and at both
ISA levels (``avx2`` and ``avx512vnni``).

Layouts: weight rows may be further apart than K (e.g. a slice ``big[:, :K]``); a weight
whose inner (K) stride is not 1 is copied to a contiguous tensor first (a full copy of the
weights on every call: keep weights contiguous). x may have any layout (copied if needed).

Fallback (documented; ``linear_path`` says which path a call takes): tensors not on the CPU
(CUDA), x or weight in float16 / float64, or autograd (an input requires grad with grad
enabled) run ``F.linear(x, weight.to(x.dtype), bias.to(x.dtype))``: the same math in x's
dtype, through torch.

Registered as ``torch.ops.ringfuse.linear`` (fake kernel, for torch.compile); eager calls
reach the kernel directly (``native.linear``), without the ~9 us of the dispatcher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common as c
from . import native
from .rms_norm import OP_LIB

# Rows up to which the per-row kernel runs (csrc/cpu/linear.h kLinearRowKernelMaxM)
ROW_KERNEL_MAX_M = native.LINEAR_ROW_KERNEL_MAX_M

ACCEPTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_F32, _BF16 = torch.float32, torch.bfloat16
_NAMES = "float32, bfloat16, float16 or float64"


def _check(x, weight, bias) -> None:
    op = "linear"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if x.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"{op}: x must have dtype {_NAMES}; got {x.dtype}")
    if weight.dtype not in ACCEPTED_DTYPES:
        hint = " (int8 weights: use ops.int8_weight_only_linear)" if weight.dtype == torch.int8 else ""
        raise TypeError(f"{op}: weight must have dtype {_NAMES}; got {weight.dtype}{hint}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension [..., K], got a scalar")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x's last dim ({x.shape[-1]}) must equal K = {k} (weight is [N, K] = {tuple(weight.shape)})")
    if not (x.is_cpu and weight.is_cpu) and weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in ACCEPTED_DTYPES:
            raise TypeError(f"{op}: bias must have dtype {_NAMES}; got {bias.dtype}")
        if bias.shape != (n,):
            raise ValueError(f"{op}: bias must have shape ({n},) (N of weight [N, K]), got {tuple(bias.shape)}")
        if not (x.is_cpu and bias.is_cpu) and bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")


def _fallback_reason(x, weight, bias) -> str | None:
    """Why a validated call cannot take the CPU kernel (None: it can)."""
    if not x.is_cpu:
        return f"x is on {x.device} (the kernel is CPU-only)"
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        return f"dtypes x {x.dtype}, weight {weight.dtype} (the kernel takes float32 / bfloat16)"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return "autograd (an input requires grad)"
    return None


def linear_path(x, weight, bias=None) -> str:
    """Which path ``linear(x, weight, bias)`` takes: ``"kernel"`` or ``"F.linear: <why>"``."""
    _check(x, weight, bias)
    why = _fallback_reason(x, weight, bias)
    return "kernel" if why is None else f"F.linear: {why}"


def _fallback(x, weight, bias):
    dt = x.dtype
    return F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))


def linear(x, weight, bias=None):
    """``x [..., K] @ weight[N, K].T + bias[N] -> [..., N]`` in x's dtype, as
    ``torch.nn.functional.linear``. CPU float32 / bfloat16 x and weight (mixed allowed) run
    the C++ kernels (up to 16 rows the bandwidth-bound one, more rows the GEMM); anything
    else (CUDA, float16 / float64, autograd) falls back to ``F.linear(x, weight.to(x.dtype),
    bias.to(x.dtype))``. See the module docstring."""
    _check(x, weight, bias)
    if _fallback_reason(x, weight, bias) is not None:
        return _fallback(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.ringfuse.linear(x, weight, bias)
    return _forward(x, weight, bias)


class PreparedLinear:
    """``linear(x, weight, bias)`` with weight and bias checked (and laid out) once, for a
    caller that applies the same weights many times, like a decode loop. A call checks only
    x: a CPU float32 / bfloat16 [M, K] tensor with a unit inner stride and no autograd goes
    straight to the kernel; anything else takes the full ``linear`` (same result, same
    errors). Made with ``prepare_linear``. A weight or bias swapped (``w.data = ...``),
    resized or written in place after preparing is noticed at the next call, which prepares
    again: the result is always that of ``linear(x, weight, bias)`` with their current
    values."""

    def __init__(self, weight, bias=None):
        self._prepare(weight, bias)

    def _prepare(self, weight, bias=None):
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"prepare_linear: weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"prepare_linear: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
        _check(weight.new_empty(0, weight.shape[1], dtype=_F32), weight, bias)  # weight and bias
        # the caller's tensors: a call re-prepares when one was swapped, resized or written in
        # place since (a private copy would be stale, the cached row stride wrong)
        self._sources = (weight,) if bias is None else (weight, bias)
        n, k = weight.shape  # rows must be apart by >= K with a unit inner stride, else a copy
        unit = weight.stride(1) == 1 or k <= 1
        self.weight = weight if unit and (n <= 1 or weight.stride(0) >= k) else weight.contiguous()
        self.bias = bias if bias is None or (bias.dtype in KERNEL_DTYPES and bias.stride(0) == 1) else \
            bias.float().contiguous()  # fmt: skip
        self.out_features, self.in_features = weight.shape
        self._direct = (self.weight.is_cpu and self.weight.dtype in KERNEL_DTYPES and self.in_features > 0
                        and (bias is None or bias.is_cpu))  # fmt: skip
        self._w_stride = max(self.weight.stride(0), self.in_features)  # one row: any stride, never read
        self._watch = c.Watch(self._sources, copies=(self.weight, self.bias))

    def __call__(self, x):
        if torch.compiler.is_compiling():  # traced: the op on the caller's tensors (no pointers to watch)
            return linear(x, *self._sources)
        if self._watch.changed():
            self._prepare(*self._sources)
        k = self.in_features
        if (not self._direct or type(x) is not torch.Tensor or x.dim() != 2 or x.dtype not in KERNEL_DTYPES
                or not x.is_cpu or x.shape[1] != k or x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < k)
                or x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)):  # fmt: skip
            return linear(x, self.weight, self.bias)
        m, n = x.shape[0], self.out_features
        out = torch.empty(m, n, dtype=x.dtype)
        if m:  # [M, N] <- [M, K] @ [N, K]^T
            native.linear(out, n, x, max(x.stride(0), k), self.weight, self._w_stride, self.bias, m, n, k)
        return out


def prepare_linear(weight, bias=None) -> PreparedLinear:
    """A ``linear`` with these weights checked once: ``prepare_linear(w, b)(x) == linear(x, w, b)``."""
    return PreparedLinear(weight, bias)


def _rows(t, k):
    """(tensor, row stride) of t as [rows, k] rows with a unit inner stride (a copy if needed)."""
    if t.is_contiguous():
        return t, k
    r = c.rows(t)
    return r.t, r.stride


def _forward(x, weight, bias):
    """The kernel on validated CPU tensors."""
    n, k = weight.shape
    lead = None if x.dim() == 2 else x.shape[:-1]
    m = x.shape[0] if lead is None else lead.numel()
    out = torch.empty(m, n, dtype=x.dtype)
    if m and n:
        xt, x_stride, wt, w_stride = x, 0, weight, 0  # K = 0: out = bias (or 0); nothing is read
        if k:
            (xt, x_stride), (wt, w_stride) = _rows(x, k), _rows(weight, k)
        if bias is not None:
            if bias.dtype not in KERNEL_DTYPES:
                bias = bias.float()
            if bias.stride(0) != 1:
                bias = bias.contiguous()
        native.linear(out, n, xt, x_stride, wt, w_stride, bias, m, n, k)
    return out if lead is None else out.view(*lead, n)


def _linear_impl(x, weight, bias=None):
    if x.is_cpu and x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES:
        return _forward(x, weight, bias)
    return _fallback(x, weight, bias)


OP_LIB.define("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")
for _key in ("CPU", "CUDA"):
    OP_LIB.impl("linear", _linear_impl, _key)


@torch.library.register_fake("ringfuse::linear")
def _linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
