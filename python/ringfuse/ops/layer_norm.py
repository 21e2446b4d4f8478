"""LayerNorm ops: ``layer_norm`` and ``add_layer_norm`` (residual add fused in).

Same registration pattern as ops/rms_norm.py. Semantics match
``torch.nn.functional.layer_norm(x, (hidden,), weight, bias, eps)``: mean and biased
variance in fp32 (two passes over the row), y = (s - mean) * rstd * w + b rounded once to
x's dtype, where s = x or round_x(x + residual).
"""

from __future__ import annotations

import torch

from . import _common as c
from . import native
from .rms_norm import OP_LIB


def kernel_for(x: torch.Tensor):
    """The kernel for x's device, each with native.layer_norm's arguments: the C++ kernel on
    the CPU; on CUDA the Triton kernel, or the CUDA C++ one (RINGFUSE_CUDA_BACKEND=cuda)."""
    if x.is_cpu:
        return native.layer_norm
    if c.cuda_backend() == "cuda":
        return native.layer_norm_cuda
    from ..kernels.layer_norm import layer_norm_rows

    return layer_norm_rows


def launch(out: c.Rows, x: c.Rows, n_rows: int, hidden: int, weight, bias, eps: float,
           res: c.Rows | None = None, res_out: c.Rows | None = None) -> None:
    """Run the kernel on validated rows."""
    if n_rows == 0:
        return
    kernel_for(x.t)(*out, *(res_out or c.NO_ROWS), *x, *(res or c.NO_ROWS), weight, bias, n_rows, hidden, eps)


def _forward(x, weight, bias, eps, residual=None, out=None, residual_out=None):
    op = "layer_norm" if residual is None else "add_layer_norm"
    c.check_float_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (the normalized one), got a scalar")
    hidden = x.shape[-1]
    c.check_param(op, "weight", weight, x, hidden)
    c.check_param(op, "bias", bias, x, hidden)
    if residual is not None:
        c.check_like(op, "residual", residual, x)
    eps = c.check_eps(op, eps)
    params = {"weight": weight, "bias": bias}
    weight, bias = c.kernel_param(weight, x), c.kernel_param(bias, x)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:  # e.g. bf16 and fp32
        weight, bias = weight.float(), bias.float()
    out_given = out
    if out is None:
        out = c.new_output(x)
        out_rows = c.Rows(out, hidden)
    else:
        out_rows = c.check_out(op, out, x.shape, x.dtype, x, {"x": x, "residual": residual, **params})
    new_res, res_out_rows = c.residual_output(op, residual, residual_out, x, out, params)
    if x.numel() == 0:
        return out, new_res
    res_rows = None if residual is None else c.rows(residual)
    launch(out_rows, c.rows(x), x.numel() // hidden, hidden, weight, bias, eps, res_rows, res_out_rows)
    c.mark_written(out_given, residual_out)
    return out, new_res


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, *, out=None):
    """LayerNorm over the last dim of ``x`` [..., hidden], like
    ``F.layer_norm(x, (hidden,), weight, bias, eps)``. ``out=`` writes into a preallocated
    tensor (no autograd)."""
    if out is None and (torch.compiler.is_compiling() or c.needs_autograd(x, weight, bias)):
        return torch.ops.ringfuse.layer_norm(x, weight, bias, eps)
    if c.plain_call(x, eps, None, weight, bias) and (
            out is None or c.plain_outputs(x, (out,), (x,), (weight, bias))):
        y, hidden = c.new_rows_output(x) if out is None else out, x.shape[-1]
        kernel_for(x)(y, hidden, None, 0, x, hidden, None, 0, weight, bias, x.numel() // hidden, hidden, eps)
        c.mark_written(out)
        return y
    return _forward(x, weight, bias, eps, out=out)[0]


def add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5, *, out=None, residual_out=None):
    """Fused ``s = x + residual`` then LayerNorm(s); returns ``(normalized, s)``.
    ``out=`` / ``residual_out=`` as in add_rms_norm."""
    fresh = out is None and residual_out is None
    if fresh and (torch.compiler.is_compiling() or c.needs_autograd(x, residual, weight, bias)):
        return torch.ops.ringfuse.add_layer_norm(x, residual, weight, bias, eps)
    if c.plain_call(x, eps, residual, weight, bias) and (
            fresh or c.plain_outputs(x, (out, residual_out), (x, residual), (weight, bias))):
        y = c.new_rows_output(x) if out is None else out
        s = c.new_rows_output(x) if residual_out is None else residual_out
        hidden = x.shape[-1]
        kernel_for(x)(y, hidden, s, hidden, x, hidden, residual, hidden, weight, bias, x.numel() // hidden,
                      hidden, eps)  # fmt: skip
        c.mark_written(out, residual_out)
        return y, s
    return _forward(x, weight, bias, eps, residual=residual, out=out, residual_out=residual_out)


OP_LIB.define("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor")
OP_LIB.define(
    "add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)"
)


def _layer_norm_kernel(x, weight, bias, eps):
    return _forward(x, weight, bias, eps)[0]


def _add_layer_norm_kernel(x, residual, weight, bias, eps):
    return _forward(x, weight, bias, eps, residual=residual)


for _key in ("CPU", "CUDA"):
    OP_LIB.impl("layer_norm", _layer_norm_kernel, _key)
    OP_LIB.impl("add_layer_norm", _add_layer_norm_kernel, _key)


@torch.library.register_fake("ringfuse::layer_norm")
def _layer_norm_fake(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ringfuse::add_layer_norm")
def _add_layer_norm_fake(x, residual, weight, bias, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def layer_norm_backward(grad_out, s, weight, eps):
    """Gradients of y = (s - mean) * rstd * w + b in fp32 torch math.
    Returns (grad_s, grad_weight or None, grad_bias) in fp32."""
    s32, g = s.float(), grad_out.float()
    mean = s32.mean(-1, keepdim=True)
    rstd = torch.rsqrt((s32 - mean).pow(2).mean(-1, keepdim=True) + eps)
    s_hat = (s32 - mean) * rstd
    gw = g * weight.float() if weight is not None else g
    grad_s = rstd * (gw - gw.mean(-1, keepdim=True) - s_hat * (gw * s_hat).mean(-1, keepdim=True))
    hidden = s.shape[-1]
    grad_w = (g * s_hat).reshape(-1, hidden).sum(0) if weight is not None else None
    return grad_s, grad_w, g.reshape(-1, hidden).sum(0)


def _setup_ln(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _param_grads(ctx, grad_w, grad_b, weight, offset):
    return (
        grad_w.to(weight.dtype) if grad_w is not None and ctx.needs_input_grad[offset] else None,
        grad_b.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[offset + 1] else None,
    )


def _backward_ln(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_s, grad_w, grad_b = layer_norm_backward(grad_out, x, weight, ctx.eps)
    gx = grad_s.to(x.dtype) if ctx.needs_input_grad[0] else None
    return (gx, *_param_grads(ctx, grad_w, grad_b, weight, 1), None)


def _setup_add_ln(ctx, inputs, output):
    _, residual, weight, bias, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_add_ln(ctx, grad_out, grad_new_residual):
    s, weight = ctx.saved_tensors
    grad_s, grad_w, grad_b = layer_norm_backward(grad_out, s, weight, ctx.eps)
    if grad_new_residual is not None:
        grad_s = grad_s + grad_new_residual.float()
    gs = grad_s.to(s.dtype)
    return (
        gs if ctx.needs_input_grad[0] else None,
        gs if ctx.needs_input_grad[1] else None,
        *_param_grads(ctx, grad_w, grad_b, weight, 2),
        None,
    )


torch.library.register_autograd("ringfuse::layer_norm", _backward_ln, setup_context=_setup_ln)
torch.library.register_autograd("ringfuse::add_layer_norm", _backward_add_ln, setup_context=_setup_add_ln)
