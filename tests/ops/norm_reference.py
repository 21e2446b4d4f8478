"""Independent references for the norm ops: fp64 math (the spec) and torch's own
same-dtype computation (the error budget of the tolerance rule in ARCHITECTURE.md)."""

import torch
import torch.nn.functional as F


def residual_sum(x, residual):
    """s = round_x(x + residual): torch's own same-dtype add."""
    return x if residual is None else x + residual


def rms_ref64(x, weight, eps, residual=None, llama=False):
    s = residual_sum(x, residual).double()
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    if llama:  # HF order: round to x's dtype before the weight
        y = y.to(x.dtype).double()
    return y if weight is None else y * weight.double()


def rms_torch(x, weight, eps, residual=None, llama=False):
    s = residual_sum(x, residual)
    if not llama:
        return F.rms_norm(s, (s.shape[-1],), weight, eps)
    # HF LlamaRMSNorm.forward
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(s.dtype)
    return h if weight is None else weight * h


def ln_ref64(x, weight, bias, eps, residual=None):
    s = residual_sum(x, residual).double()
    m = s.mean(-1, keepdim=True)
    y = (s - m) * torch.rsqrt((s - m).pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def ln_torch(x, weight, bias, eps, residual=None):
    s = residual_sum(x, residual)
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def assert_within_tolerance(got, ref64, torch_same_dtype, what="", rounding_dtype=None):
    """ARCHITECTURE.md's tolerance rule: max error vs the fp64 reference <= 2x torch's own same-dtype
    error, with a floor of one unit of precision at the output's scale (torch's error can
    be exactly 0 on a few elements by luck). ``rounding_dtype``: the dtype of an
    intermediate rounding (the llama cast order), whose unit sets the floor instead: a
    value next to a rounding boundary may round either way."""
    assert got.shape == ref64.shape, (got.shape, ref64.shape)
    assert got.dtype == torch_same_dtype.dtype, (got.dtype, torch_same_dtype.dtype)
    if got.numel() == 0:
        return
    err = (got.double() - ref64).abs().max().item()
    err_torch = (torch_same_dtype.double() - ref64).abs().max().item()
    floor = torch.finfo(rounding_dtype or got.dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= 2 * err_torch + floor, f"{what}: error {err:.3g} > 2 x torch's {err_torch:.3g} + {floor:.3g}"
