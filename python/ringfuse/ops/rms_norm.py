"""RMSNorm ops: ``rms_norm``, ``add_rms_norm`` (residual add fused in) and the in-place
``add_rms_norm_`` (vLLM's fused_add_rms_norm).

Registered as ``torch.ops.ringfuse.*`` with ``torch.library.Library`` (fake kernels for
torch.compile, autograd). The Python functions below call the kernels directly when no
autograd or tracing is involved: the dispatcher costs ~9 us a call, more than a
decode-sized norm takes.

Semantics: s = x (or round_x(x + residual)); rstd = 1 / sqrt(mean(s^2) + eps) in fp32.
cast_mode="torch": y = s * rstd * w, one rounding (torch.nn.functional.rms_norm).
cast_mode="llama": y = round_x(s * rstd) * w (HF LlamaRMSNorm); the output dtype is then
promote(x.dtype, weight.dtype), as HF's ``weight * hidden.to(input_dtype)`` gives.
"""

from __future__ import annotations

import torch

from . import _common as c
from . import native

OP_LIB = torch.library.Library("ringfuse", "FRAGMENT")
CAST_MODES = ("torch", "llama")


def _llama(op: str, cast_mode) -> bool:
    if cast_mode not in CAST_MODES:
        raise ValueError(f"{op}: cast_mode must be one of {CAST_MODES}, got {cast_mode!r}")
    return cast_mode == "llama"


def _out_dtype(x: torch.Tensor, weight, llama: bool) -> torch.dtype:
    if llama and weight is not None:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


def kernel_for(x: torch.Tensor):
    """The kernel for x's device, each with native.rms_norm's arguments: the C++ kernel on
    the CPU; on CUDA the Triton kernel, or the CUDA C++ one (RINGFUSE_CUDA_BACKEND=cuda)."""
    if x.is_cpu:
        return native.rms_norm
    if c.cuda_backend() == "cuda":
        return native.rms_norm_cuda
    from ..kernels.rms_norm import rms_norm_rows

    return rms_norm_rows


def launch(out: c.Rows, x: c.Rows, n_rows: int, hidden: int, weight, eps: float, llama: bool,
           res: c.Rows | None = None, res_out: c.Rows | None = None) -> None:
    """Run the kernel on validated rows."""
    if n_rows == 0:
        return
    kernel_for(x.t)(*out, *(res_out or c.NO_ROWS), *x, *(res or c.NO_ROWS), weight, n_rows, hidden, eps, llama)


def _check(op: str, x, weight, eps, residual=None) -> float:
    c.check_float_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (the normalized one), got a scalar")
    c.check_param(op, "weight", weight, x, x.shape[-1])
    if residual is not None:
        c.check_like(op, "residual", residual, x)
    return c.check_eps(op, eps)


def _forward(x, weight, eps, llama, residual=None, out=None, residual_out=None):
    """Validated forward shared by every entry point: returns (out, new_residual or None)."""
    op = "rms_norm" if residual is None else "add_rms_norm"
    eps = _check(op, x, weight, eps, residual)
    out_dtype = _out_dtype(x, weight, llama)
    params = {"weight": weight}
    weight = c.kernel_param(weight, x)
    out_given = out
    if out is None:
        out = c.new_output(x, out_dtype)
        out_rows = c.Rows(out, x.shape[-1])
    else:
        out_rows = c.check_out(op, out, x.shape, out_dtype, x, {"x": x, "residual": residual, **params})
    new_res, res_out_rows = c.residual_output(op, residual, residual_out, x, out, params)
    n = x.numel()
    if n == 0:
        return out, new_res
    hidden = x.shape[-1]
    res_rows = None if residual is None else c.rows(residual)
    launch(out_rows, c.rows(x), n // hidden, hidden, weight, eps, llama, res_rows, res_out_rows)
    c.mark_written(out_given, residual_out)
    return out, new_res


# ---------------------------------------------------------------------------------------
# Public functions


def rms_norm(x, weight=None, eps: float = 1e-6, *, cast_mode: str = "torch", out=None):
    """RMSNorm over the last dim of ``x`` [..., hidden] -> [..., hidden].

    Like ``F.rms_norm(x, (hidden,), weight, eps)`` (cast_mode="torch") or HF LlamaRMSNorm
    (cast_mode="llama"). ``out=`` writes into a preallocated tensor (no autograd).
    """
    llama = _llama("rms_norm", cast_mode)
    if out is None and (torch.compiler.is_compiling() or c.needs_autograd(x, weight)):
        return torch.ops.ringfuse.rms_norm(x, weight, eps, llama)
    # weight in x's dtype: the output is x's dtype in both modes
    if c.plain_call(x, eps, None, weight) and (out is None or c.plain_outputs(x, (out,), (x,), (weight,))):
        y, hidden = c.new_rows_output(x) if out is None else out, x.shape[-1]
        kernel_for(x)(y, hidden, None, 0, x, hidden, None, 0, weight, x.numel() // hidden, hidden, eps, llama)
        c.mark_written(out)
        return y
    return _forward(x, weight, eps, llama, out=out)[0]


def add_rms_norm(x, residual, weight=None, eps: float = 1e-6, *, cast_mode: str = "torch", out=None,
                 residual_out=None):
    """Fused ``s = x + residual`` then RMSNorm(s). Returns ``(normalized, s)``: one pass
    over memory instead of torch's add, pow, mean, rsqrt and multiplies. ``out=`` and
    ``residual_out=`` write into preallocated tensors (``residual_out`` may be ``residual``
    itself: the residual stream is then updated in place)."""
    llama = _llama("add_rms_norm", cast_mode)
    fresh = out is None and residual_out is None
    if fresh and (torch.compiler.is_compiling() or c.needs_autograd(x, residual, weight)):
        return torch.ops.ringfuse.add_rms_norm(x, residual, weight, eps, llama)
    if c.plain_call(x, eps, residual, weight) and (
            fresh or c.plain_outputs(x, (out, residual_out), (x, residual), (weight,))):
        y = c.new_rows_output(x) if out is None else out
        s = c.new_rows_output(x) if residual_out is None else residual_out
        hidden = x.shape[-1]
        kernel_for(x)(y, hidden, s, hidden, x, hidden, residual, hidden, weight, x.numel() // hidden, hidden, eps,
                      llama)  # fmt: skip
        c.mark_written(out, residual_out)
        return y, s
    return _forward(x, weight, eps, llama, residual=residual, out=out, residual_out=residual_out)


def add_rms_norm_(x, residual, weight=None, eps: float = 1e-6, *, cast_mode: str = "torch"):
    """In place, as vLLM's fused_add_rms_norm: ``residual <- x + residual`` and
    ``x <- RMSNorm(x + residual)``. Returns ``(x, residual)``. Inference only (no autograd);
    x and residual must have the rows layout (unit inner stride, one row stride)."""
    llama = _llama("add_rms_norm_", cast_mode)
    if torch.compiler.is_compiling():
        torch.ops.ringfuse.add_rms_norm_(x, residual, weight, eps, llama)
    else:
        _add_rms_norm_inplace(x, residual, weight, eps, llama)
    return x, residual


def _add_rms_norm_inplace(x, residual, weight, eps, llama) -> None:
    op = "add_rms_norm_"
    eps = _check(op, x, weight, eps, residual)
    if c.needs_autograd(x, residual, weight):
        raise ValueError(f"{op}: the in-place op does not support autograd; use add_rms_norm")
    if _out_dtype(x, weight, llama) != x.dtype:
        raise TypeError(f"{op}: cast_mode='llama' with a float32 weight gives a float32 output; x ({x.dtype}) cannot hold it")
    if x.numel() == 0:
        return
    x_rows, res_rows = c.rows(x), c.rows(residual)
    if x_rows.t.data_ptr() != x.data_ptr() or res_rows.t.data_ptr() != residual.data_ptr():
        raise ValueError(f"{op}: x and residual must have a unit inner stride and one row stride to be updated in place")
    xs, rs = c.span(x), c.span(residual)
    if c.spans_overlap(xs, rs):
        raise ValueError(f"{op}: x and residual must not share memory (got the same tensor or overlapping views)")
    if weight is not None and weight.numel():
        ws = c.span(weight)
        if c.spans_overlap(ws, xs) or c.spans_overlap(ws, rs):
            raise ValueError(f"{op}: weight must not share memory with x or residual, which are overwritten")
    weight = c.kernel_param(weight, x)
    hidden = x.shape[-1]
    launch(x_rows, x_rows, x.numel() // hidden, hidden, weight, eps, llama, res_rows, res_rows)
    c.mark_written(x, residual)


class PreparedRMSNorm:
    """RMSNorm with its weight, eps and cast mode checked once, for a caller that applies
    the same norm many times, like a decode loop. ``norm.add_(x, residual)`` is
    ``add_rms_norm_(x, residual, weight, eps, cast_mode=...)``: contiguous CPU x and residual
    of one shape and dtype go straight to the kernel after a shape, dtype and overlap check;
    anything else takes the full op (same result, same errors). Made with
    ``prepare_rms_norm``."""

    def __init__(self, weight, eps: float = 1e-6, *, cast_mode: str = "torch"):
        op = "prepare_rms_norm"
        self.llama = _llama(op, cast_mode)
        self.cast_mode = cast_mode
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise ValueError(f"{op}: weight must be a 1-D tensor [hidden], got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")  # fmt: skip
        probe = weight.new_empty(0, weight.shape[0], dtype=weight.dtype if weight.dtype in c.FLOAT_DTYPES else torch.float32)
        self.eps = _check(op, probe, weight, eps)
        self.weight, self.hidden = weight, weight.shape[0]
        self._w = c.kernel_param(weight, probe)  # contiguous; x's dtype or fp32
        self._direct = weight.is_cpu and not weight.requires_grad
        # where the kernel's weight lies, for the overlap check (self._w is the watched weight or
        # this object's own copy: it does not move while the watch holds)
        self._w_span = c.span(self._w) if self._w.numel() else (0, 0)
        self._watch = c.Watch((weight,))  # a swapped / resized / rewritten weight: prepare again

    def __call__(self, x, *, out=None):
        """``rms_norm(x, weight, eps, cast_mode=..., out=out)`` (the full op and its checks)."""
        return rms_norm(x, self.weight, self.eps, cast_mode=self.cast_mode, out=out)

    def add_(self, x, residual):
        """residual <- x + residual; x <- RMSNorm(x + residual), in place. Returns (x, residual)."""
        if torch.compiler.is_compiling():  # traced: the op on the caller's weight (no pointers to watch)
            return add_rms_norm_(x, residual, self.weight, self.eps, cast_mode=self.cast_mode)
        if self._watch.changed():
            self.__init__(self.weight, self.eps, cast_mode=self.cast_mode)
        h = self.hidden
        if (not self._direct or type(x) is not torch.Tensor or type(residual) is not torch.Tensor
                or x.dim() != 2 or x.shape[1] != h or residual.shape != x.shape or residual.dtype is not x.dtype
                or not x.is_cpu or not residual.is_cpu or x.requires_grad or residual.requires_grad
                or not x.is_contiguous() or not residual.is_contiguous() or x.dtype not in c.FLOAT_DTYPES
                or (self._w.dtype is not x.dtype and self._w.dtype is not torch.float32)  # as kernel_param
                or (self.llama and torch.promote_types(x.dtype, self.weight.dtype) is not x.dtype)):  # fmt: skip
            return add_rms_norm_(x, residual, self.weight, self.eps, cast_mode=self.cast_mode)
        n = x.shape[0]
        if n:
            xp, rp, nbytes = x.data_ptr(), residual.data_ptr(), x.nbytes
            if xp < rp + nbytes and rp < xp + nbytes:
                raise ValueError("add_rms_norm_: x and residual must not share memory (got the same tensor or "
                                 "overlapping views)")  # fmt: skip
            w0, w1 = self._w_span
            if (w0 < xp + nbytes and xp < w1) or (w0 < rp + nbytes and rp < w1):
                raise ValueError("add_rms_norm_: weight must not share memory with x or residual, which are overwritten")
            # [n, h] rows, h apart, updated in place
            native.rms_norm(x, h, residual, h, x, h, residual, h, self._w, n, h, self.eps, self.llama)
            c.mark_written(x, residual)
        return x, residual


def prepare_rms_norm(weight, eps: float = 1e-6, *, cast_mode: str = "torch") -> PreparedRMSNorm:
    """An RMSNorm with this weight checked once: ``prepare_rms_norm(w, eps).add_(x, r)`` is
    ``add_rms_norm_(x, r, w, eps)``."""
    return PreparedRMSNorm(weight, eps, cast_mode=cast_mode)


# ---------------------------------------------------------------------------------------
# torch.library registration: schema, device kernels, fake kernels, autograd

OP_LIB.define("rms_norm(Tensor x, Tensor? weight, float eps, bool llama_cast) -> Tensor")
OP_LIB.define(
    "add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps, bool llama_cast) -> (Tensor, Tensor)"
)
OP_LIB.define(
    "add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor? weight, float eps, bool llama_cast) -> ()"
)


def _rms_norm_kernel(x, weight, eps, llama_cast):
    return _forward(x, weight, eps, llama_cast)[0]


def _add_rms_norm_kernel(x, residual, weight, eps, llama_cast):
    return _forward(x, weight, eps, llama_cast, residual=residual)


for _key in ("CPU", "CUDA"):
    OP_LIB.impl("rms_norm", _rms_norm_kernel, _key)
    OP_LIB.impl("add_rms_norm", _add_rms_norm_kernel, _key)
    OP_LIB.impl("add_rms_norm_", _add_rms_norm_inplace, _key)


@torch.library.register_fake("ringfuse::rms_norm")
def _rms_norm_fake(x, weight, eps, llama_cast):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, llama_cast))


@torch.library.register_fake("ringfuse::add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps, llama_cast):
    # both outputs are new contiguous tensors, whatever x's layout
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, llama_cast)), x.new_empty(x.shape)


@torch.library.register_fake("ringfuse::add_rms_norm_")
def _add_rms_norm_inplace_fake(x, residual, weight, eps, llama_cast):
    return None


def rms_norm_backward(grad_out, s, weight, eps):
    """Gradients of y = s * rstd * w in fp32 torch math (the rounding of the llama cast
    order is treated as identity). Returns (grad_s fp32, grad_weight fp32 or None)."""
    s32 = s.float()
    g = grad_out.float()
    rstd = torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    s_hat = s32 * rstd
    gw = g * weight.float() if weight is not None else g
    grad_s = rstd * (gw - s_hat * (gw * s_hat).mean(-1, keepdim=True))
    grad_w = (g * s_hat).reshape(-1, s.shape[-1]).sum(0) if weight is not None else None
    return grad_s, grad_w


def _setup_rms(ctx, inputs, output):
    x, weight, eps, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward_rms(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_s, grad_w = rms_norm_backward(grad_out, x, weight, ctx.eps)
    return (
        grad_s.to(x.dtype) if ctx.needs_input_grad[0] else None,
        grad_w.to(weight.dtype) if grad_w is not None and ctx.needs_input_grad[1] else None,
        None,
        None,
    )


def _setup_add_rms(ctx, inputs, output):
    _, residual, weight, eps, _ = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps
    ctx.res_dtype = residual.dtype


def _backward_add_rms(ctx, grad_out, grad_new_residual):
    s, weight = ctx.saved_tensors
    grad_s, grad_w = rms_norm_backward(grad_out, s, weight, ctx.eps)
    if grad_new_residual is not None:
        grad_s = grad_s + grad_new_residual.float()
    return (
        grad_s.to(s.dtype) if ctx.needs_input_grad[0] else None,
        grad_s.to(ctx.res_dtype) if ctx.needs_input_grad[1] else None,
        grad_w.to(weight.dtype) if grad_w is not None and ctx.needs_input_grad[2] else None,
        None,
        None,
    )


torch.library.register_autograd("ringfuse::rms_norm", _backward_rms, setup_context=_setup_rms)
torch.library.register_autograd("ringfuse::add_rms_norm", _backward_add_rms, setup_context=_setup_add_rms)
