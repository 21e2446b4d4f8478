"""Property tests (hypothesis): random shapes, row strides, dtypes and options for every
norm op on the CPU path, against the fp64 reference under the tolerance rule."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringfuse import ops

from .norm_reference import assert_within_tolerance, ln_ref64, ln_torch, rms_ref64, rms_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def norm_case(draw):
    rows = draw(st.integers(1, 40))
    hidden = draw(st.integers(1, 700))
    pad = draw(st.sampled_from([0, 0, 1, 9]))  # row stride = hidden + pad (a slice of a wider buffer)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    wide = (torch.randn(rows, hidden + pad, generator=g) * scale).to(dtype)
    x = wide[:, :hidden]
    r = (torch.randn(rows, hidden, generator=g) * scale).to(dtype)
    wdtype = draw(st.sampled_from([None, dtype, torch.float32]))
    w = None if wdtype is None else (torch.rand(hidden, generator=g) + 0.5).to(wdtype)
    b = None if wdtype is None or not draw(st.booleans()) else (torch.randn(hidden, generator=g) * 0.1).to(wdtype)
    return x, r, w, b, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(norm_case())
def test_rms_norm_family(case):
    x, r, w, _, with_residual = case
    res = r if with_residual else None
    if with_residual:
        out, s = ops.add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(s, x + r)
    else:
        out = ops.rms_norm(x, w, 1e-6)
    wt = None if w is None else w.to(x.dtype)
    assert_within_tolerance(out, rms_ref64(x, w, 1e-6, res), rms_torch(x, wt, 1e-6, res))


@settings(max_examples=150, deadline=None)
@given(norm_case())
def test_layer_norm_family(case):
    x, r, w, b, with_residual = case
    res = r if with_residual else None
    if with_residual:
        out, s = ops.add_layer_norm(x, r, w, b, 1e-5)
        assert torch.equal(s, x + r)
    else:
        out = ops.layer_norm(x, w, b, 1e-5)
    wt = None if w is None else w.to(x.dtype)
    bt = None if b is None else b.to(x.dtype)
    assert_within_tolerance(out, ln_ref64(x, w, b, 1e-5, res), ln_torch(x, wt, bt, 1e-5, res))
