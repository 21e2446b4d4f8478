"""Property tests (hypothesis): random shapes, row strides, dtypes and options for every
norm op on the CPU path, against the fp64 reference under the tolerance rule."""

import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringfuse import ops
from ringfuse.ops._common import plain_call

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


# The ops skip their checks for the common call (ops/_common.py plain_call); that
# shortcut must give the full path's bits on every case it takes, and leave every other case
# to the full checks.
_ln = sys.modules["ringfuse.ops.layer_norm"]
_rms = sys.modules["ringfuse.ops.rms_norm"]


@settings(max_examples=100, deadline=None)
@given(norm_case(), st.sampled_from(["torch", "llama"]))
def test_checked_and_unchecked_calls_agree_bitwise(case, cast_mode):
    x, r, w, b, _ = case
    x = x.contiguous() if x.shape[0] % 2 else x  # both: plain calls and strided ones
    llama = cast_mode == "llama"
    assert torch.equal(ops.rms_norm(x, w, 1e-6, cast_mode=cast_mode), _rms._forward(x, w, 1e-6, llama)[0])
    for got, want in zip(ops.add_rms_norm(x, r, w, 1e-6, cast_mode=cast_mode),
                         _rms._forward(x, w, 1e-6, llama, residual=r)):  # fmt: skip
        assert torch.equal(got, want)
    assert torch.equal(ops.layer_norm(x, w, b, 1e-5), _ln._forward(x, w, b, 1e-5)[0])
    for got, want in zip(ops.add_layer_norm(x, r, w, b, 1e-5), _ln._forward(x, w, b, 1e-5, residual=r)):
        assert torch.equal(got, want)


def test_unchecked_path_takes_only_plain_calls():
    x, w, r = torch.randn(3, 8), torch.rand(8), torch.randn(3, 8)
    assert plain_call(x, 1e-5, r, w, None)
    rejected = {
        "x not a tensor": (x.tolist(), 1e-5, None, w),
        "x float64": (x.double(), 1e-5, None, w),
        "x int": (x.int(), 1e-5, None, w),
        "x strided": (torch.randn(3, 16)[:, :8], 1e-5, None, None),
        "x scalar": (torch.tensor(1.0), 1e-5, None, None),
        "x empty": (torch.randn(0, 8), 1e-5, None, None),
        "eps int": (x, 1, None, w),
        "eps bool": (x, True, None, w),
        "eps nan": (x, float("nan"), None, w),
        "eps inf": (x, float("inf"), None, w),
        "eps 0": (x, 0.0, None, w),
        "eps subnormal in fp32": (x, 1e-40, None, w),
        "residual other dtype": (x, 1e-5, r.bfloat16(), w),
        "residual other shape": (x, 1e-5, r[:2], w),
        "residual strided": (x, 1e-5, torch.randn(3, 16)[:, :8], w),
        "residual not a tensor": (x, 1e-5, 1.0, w),
        "weight other dtype": (x, 1e-5, None, w.bfloat16()),
        "weight fp32 with bf16 x": (x.bfloat16(), 1e-5, None, w),
        "weight wrong size": (x, 1e-5, None, torch.rand(7)),
        "weight 2-D": (x, 1e-5, None, torch.rand(1, 8)),
        "weight strided": (x, 1e-5, None, torch.rand(16)[::2]),
        "weight not a tensor": (x, 1e-5, None, [1.0] * 8),
    }
    meta = torch.device("meta")
    rejected |= {
        "x on neither the CPU nor CUDA": (x.to(meta), 1e-5, None, None),
        "residual on another device": (x, 1e-5, r.to(meta), w),
        "weight on another device": (x, 1e-5, None, w.to(meta)),
    }
    for why, args in rejected.items():
        assert not plain_call(*args), why
