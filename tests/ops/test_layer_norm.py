"""ringfuse.ops.layer_norm / add_layer_norm on CPU vs an fp64 reference."""

import pytest
import torch
import torch.nn.functional as F

from ringfuse.ops import add_layer_norm, layer_norm

from .norm_reference import assert_within_tolerance, ln_ref64, ln_torch
from .test_rms_norm import DTYPES, NAN_PAYLOADS, SHAPES, WEIGHT_CASES, make, make_weight, nan_with_bits


def params(wkind, hidden, dtype, bias=True):
    w = make_weight(wkind, hidden, dtype)
    b = None if (w is None or not bias) else (make((hidden,), torch.float32, seed=11) * 0.1).to(w.dtype)
    return w, b


@pytest.mark.parametrize("dtype,wkind", WEIGHT_CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_reference(isa, dtype, wkind, shape, bias):
    x = make(shape, dtype)
    w, b = params(wkind, shape[-1], dtype, bias)
    got = layer_norm(x, w, b, 1e-5)
    assert_within_tolerance(got, ln_ref64(x, w, b, 1e-5), ln_torch(x, w, b, 1e-5), isa)


@pytest.mark.parametrize("dtype,wkind", WEIGHT_CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_layer_norm_matches_reference(isa, dtype, wkind, shape):
    x, r = make(shape, dtype, seed=1), make(shape, dtype, seed=2)
    w, b = params(wkind, shape[-1], dtype)
    out, s = add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(s, x + r)
    assert_within_tolerance(out, ln_ref64(x, w, b, 1e-5, r), ln_torch(x, w, b, 1e-5, r), isa)


def test_bias_without_weight(isa):
    x = make((3, 40), torch.float32)
    b = torch.linspace(-1, 1, 40)
    assert_within_tolerance(layer_norm(x, None, b), ln_ref64(x, None, b, 1e-5), ln_torch(x, None, b, 1e-5))


def test_large_mean_is_stable(isa):
    """Two-pass variance: rows with |mean| >> std keep full accuracy (E[x^2]-E[x]^2 would not)."""
    x = make((8, 1024), torch.float32, scale=1e-2, offset=1e3)
    assert_within_tolerance(layer_norm(x, None, None), ln_ref64(x, None, None, 1e-5), ln_torch(x, None, None, 1e-5))


def test_constant_rows(isa):
    x = torch.full((3, 17), 2.5)
    torch.testing.assert_close(layer_norm(x), F.layer_norm(x, (17,)))


def test_layouts_and_out(isa):
    big = make((6, 100), torch.float16)
    x = big[:, :77]
    w, b = params("same", 77, torch.float16)
    got = layer_norm(x, w, b)
    assert_within_tolerance(got, ln_ref64(x, w, b, 1e-5), ln_torch(x, w, b, 1e-5))
    xt = make((20, 30), torch.float32).t()
    assert_within_tolerance(layer_norm(xt), ln_ref64(xt, None, None, 1e-5), ln_torch(xt, None, None, 1e-5))
    out = torch.empty_like(x)
    assert layer_norm(x, w, b, out=out) is out and torch.equal(out, got)
    r = make((6, 77), torch.float16, seed=4)
    out2 = torch.empty_like(x)
    o, s = add_layer_norm(x, r, w, b, out=out2)
    assert o is out2 and torch.equal(s, x + r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_propagate_like_torch(isa, dtype):
    x = make((3, 21), dtype)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    got, expect = layer_norm(x), F.layer_norm(x, (21,))
    assert torch.equal(got.isnan(), expect.isnan())
    torch.testing.assert_close(got[2], expect[2])


def test_fp32_params_nan_payloads_give_nan_in_bf16_output(isa):
    hidden = 80  # five 16-lane blocks: the vector path, not only the tail
    x = make((5, hidden), torch.bfloat16)
    w, b = torch.rand(hidden) + 0.5, torch.randn(hidden) * 0.1
    w_cols, b_cols = [1, 40, 79], [18, 63]
    for col, bits in zip(w_cols + b_cols, NAN_PAYLOADS):
        (w if col in w_cols else b)[col] = nan_with_bits(bits)
    got = layer_norm(x, w, b)
    expect = torch.zeros(5, hidden, dtype=torch.bool)
    expect[:, w_cols + b_cols] = True
    assert torch.equal(got.isnan(), expect)


def test_empty():
    x = torch.empty(0, 8)
    assert layer_norm(x, torch.ones(8), torch.zeros(8)).shape == (0, 8)
    assert add_layer_norm(x, x, None)[1].shape == (0, 8)


def test_bad_inputs():
    x = make((4, 8), torch.float32)
    with pytest.raises(TypeError, match="x must have dtype"):
        layer_norm(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        layer_norm(x, torch.ones(8), torch.ones(9))
    with pytest.raises(TypeError, match="bias must have dtype"):
        layer_norm(x, None, torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="out overlaps bias"):
        buf = torch.randn(5, 8)
        layer_norm(torch.randn(5, 8), torch.randn(8), buf[0], out=buf)
    with pytest.raises(ValueError, match="bias is on meta"):
        layer_norm(x, None, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, eps=0.0)
    with pytest.raises(ValueError, match="residual must have the shape"):
        add_layer_norm(x, x[:2])


def test_autograd_matches_torch():
    x = make((5, 33), torch.float32).requires_grad_()
    r = make((5, 33), torch.float32, seed=3).requires_grad_()
    w, b = (t.clone().requires_grad_() for t in params("same", 33, torch.float32))
    g, gs = make((5, 33), torch.float32, seed=8), make((5, 33), torch.float32, seed=9)
    out, s = add_layer_norm(x, r, w, b)
    (out * g + s * gs).sum().backward()
    ours = [t.grad.clone() for t in (x, r, w, b)]
    for t in (x, r, w, b):
        t.grad = None
    s_ref = x + r
    (F.layer_norm(s_ref, (33,), w, b) * g + s_ref * gs).sum().backward()
    for a, e in zip(ours, (x.grad, r.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    for t in (x, w, b):
        t.grad = None
    (layer_norm(x, w, b) * g).sum().backward()
    ours = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    (F.layer_norm(x, (33,), w, b) * g).sum().backward()
    for a, e in zip(ours, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    def f(x, r, w, b):
        h, s = add_layer_norm(x, r, w, b)
        return layer_norm(h, w, b) * s

    x, r = make((4, 48), torch.float32), make((4, 48), torch.float32, seed=1)
    w, b = params("same", 48, torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, r, w, b), f(x, r, w, b))


def test_mixed_parameter_dtypes(isa):
    """weight and bias in different float dtypes are computed in fp32."""
    x = make((6, 33), torch.bfloat16)
    w, b = make_weight("same", 33, torch.bfloat16), (make((33,), torch.float32, seed=3) * 0.1)
    got = layer_norm(x, w, b)
    ref = ln_ref64(x, w, b, 1e-5)
    assert_within_tolerance(got, ref, F.layer_norm(x.float(), (33,), w.float(), b, 1e-5).to(x.dtype))


def test_opcheck():
    xt, rt = make((16, 4), torch.float32).t(), make((16, 4), torch.float32, seed=1).t()
    w, b = params("same", 16, torch.float32)
    torch.library.opcheck(torch.ops.ringfuse.layer_norm.default, (xt, w, b, 1e-5))
    torch.library.opcheck(torch.ops.ringfuse.add_layer_norm.default, (xt, rt, w, None, 1e-5))
