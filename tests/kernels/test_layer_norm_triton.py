"""kernels/layer_norm.py under the Triton interpreter (TRITON_INTERPRET=1, set in conftest),
on CPU tensors, vs an independent fp64 reference written here.

Tolerance (ARCHITECTURE.md): kernel error vs the fp64 reference <= 2x the error of torch's own
computation (F.layer_norm) vs that reference, plus a floor of one fp32 ulp at the output's
magnitude (torch sometimes lands a lucky half ulp on fp32 outputs; the floor is negligible
for fp16 / bf16 outputs).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ringfuse.kernels import layer_norm as triton_layer_norm

from .triton_helpers import interp_only

layer_norm_fwd = triton_layer_norm.layer_norm_fwd

# CPU tensors only run under the interpreter; with TRITON_INTERPRET=0 (e.g. a GPU run of
# the suite) these tests skip and the GPU tests of the ops cover the compiled kernels
pytestmark = [
    interp_only,
    # rounds the interpreter's fp32 -> bf16 casts as GPUs do (tests/kernels/conftest.py)
    pytest.mark.usefixtures("interpreter_bf16_round_to_nearest_even"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = (1, 3, 7)
EPS = 1e-5
LOOPED_HIDDEN = 2 * triton_layer_norm.MAX_ROW_BLOCK + 11  # > MAX_ROW_BLOCK, odd, partial last chunk




# ---------------------------------------------------------------------------------------
# Reference and baseline


def round_sum(x, residual):
    """s = round_x(x + residual), the add done in fp32."""
    return (x.float() + residual.float()).to(x.dtype)


def reference(s, weight, bias, eps):
    """fp64 LayerNorm of s: two-pass mean and biased variance."""
    s64 = s.double()
    mean = s64.mean(-1, keepdim=True)
    var = (s64 - mean).pow(2).mean(-1, keepdim=True)
    y = (s64 - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def torch_baseline(s, weight, bias, eps, out_dtype):
    """F.layer_norm in the promoted dtype of the inputs and the output."""
    cdt = torch.promote_types(s.dtype, out_dtype)
    for p in (weight, bias):
        if p is not None:
            cdt = torch.promote_types(cdt, p.dtype)
    w = weight.to(cdt) if weight is not None else None
    b = bias.to(cdt) if bias is not None else None
    return F.layer_norm(s.to(cdt), (s.shape[-1],), w, b, eps).to(out_dtype)


def assert_close_2x(out, s, weight, bias, eps):
    ref = reference(s, weight, bias, eps)
    base = torch_baseline(s, weight, bias, eps, out.dtype)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    err_torch = (base.double() - ref).abs().max().item()
    floor = torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert err <= 2 * err_torch + floor, f"kernel error {err:.3e} > 2 x torch error {err_torch:.3e} (+{floor:.1e})"


def make_inputs(rows, hidden, dtype, param_kind, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g) + offset).to(dtype)
    r = torch.randn(rows, hidden, generator=g).to(dtype)
    if param_kind is None:
        return x, r, None, None
    pdt = dtype if param_kind == "same" else torch.float32
    w = (1.0 + 0.5 * torch.randn(hidden, generator=g)).to(pdt)
    b = (0.5 * torch.randn(hidden, generator=g)).to(pdt)
    return x, r, w, b


def run(x, w, b, residual=None, out_dtype=None):
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype)
    res_out = None if residual is None else torch.empty_like(residual)
    layer_norm_fwd(out, x, w, b, EPS, residual=residual, residual_out=res_out)
    return out, res_out


# ---------------------------------------------------------------------------------------
# Accuracy over dtypes x odd shapes x options

CASES = [
    (dtype, pk, wb, out_fp32, res)
    for dtype in DTYPES
    for pk in ((None, "same") if dtype == torch.float32 else (None, "same", "fp32"))
    for wb in (("wb",) if pk is None else ("wb", "w", "b"))
    for out_fp32 in ((False,) if dtype == torch.float32 else (False, True))
    for res in (False, True)
]


def case_id(c):
    dtype, pk, wb, out_fp32, res = c
    params = "none" if pk is None else f"{wb}-{pk}"
    return f"{str(dtype)[6:]}-{params}-out{'fp32' if out_fp32 else 'x'}-res{int(res)}"


def select(w, b, wb):
    return (w if "w" in wb else None), (b if "b" in wb else None)


@pytest.mark.parametrize("hidden", [1, 7, 64, 577])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(hidden, case):
    dtype, pk, wb, out_fp32, has_res = case
    for rows in ROWS:
        x, r, w, b = make_inputs(rows, hidden, dtype, pk, seed=rows * 1000 + hidden)
        w, b = select(w, b, wb)
        residual = r if has_res else None
        out, res_out = run(x, w, b, residual, torch.float32 if out_fp32 else None)
        s = x
        if has_res:
            s = round_sum(x, r)
            assert torch.equal(res_out, x + r), "residual_out must be x + residual rounded to x's dtype"
        assert_close_2x(out, s, w, b, EPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("has_res", [False, True])
def test_looped_large_hidden(dtype, has_res):
    hidden = LOOPED_HIDDEN
    kernel, block, _ = triton_layer_norm._pick(hidden)
    assert kernel is triton_layer_norm._layer_norm_fwd_looped_kernel and hidden % block != 0
    x, r, w, b = make_inputs(2, hidden, dtype, "fp32" if dtype == torch.bfloat16 else "same", seed=7)
    residual = r if has_res else None
    out, res_out = run(x, w, b, residual)
    s = x
    if has_res:
        s = round_sum(x, r)
        assert torch.equal(res_out, x + r)
    assert_close_2x(out, s, w, b, EPS)


def test_hidden_65536():
    x, r, w, b = make_inputs(1, 65536, torch.bfloat16, "same", seed=3)
    out, res_out = run(x, w, b, residual=r)
    assert torch.equal(res_out, x + r)
    assert_close_2x(out, round_sum(x, r), w, b, EPS)


@pytest.mark.parametrize("hidden", [577, LOOPED_HIDDEN])
def test_large_mean_small_variance(hidden):
    """mean 1e3, std 1e-1 in fp32: E[x^2] - E[x]^2 would lose every digit of the variance.
    The corrected two-pass (row kernel) and shifted Welford + Chan merge (looped kernel) do
    better than torch here: s - mean keeps fp32 precision, where torch's fp32 mean is off by
    up to half an ulp of 1e3 (~3e-5, times rstd ~10 in the output)."""
    for seed in range(3):
        x, _, w, b = make_inputs(2, hidden, torch.float32, "same", seed=seed)
        x = x * 1e-1 + 1e3
        out, _ = run(x, w, b)
        assert_close_2x(out, x, w, b, EPS)
        err = (out.double() - reference(x, w, b, EPS)).abs().max().item()
        assert err < 1e-5, err  # outputs are O(1); torch's error here is ~6e-4


def test_zero_rows_launch_nothing():
    x = torch.empty(0, 64)
    out = torch.empty(0, 64)
    layer_norm_fwd(out, x, None, None, EPS)


def test_constant_row():
    """variance 0: rstd = 1/sqrt(eps), output is exactly the bias."""
    x = torch.full((2, 577), 3.0, dtype=torch.bfloat16)
    b = torch.randn(577).bfloat16()
    out, _ = run(x, torch.ones(577, dtype=torch.bfloat16), b)
    assert torch.equal(out, b.expand(2, -1))


# ---------------------------------------------------------------------------------------
# Layouts: strided rows, writes stay inside [rows, hidden], aliasing


@pytest.mark.parametrize("hidden", [7, 577, LOOPED_HIDDEN])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_strided_rows_and_untouched_padding(hidden, dtype):
    rows, pad = (3, 13) if hidden < 1000 else (2, 5)
    x_big, r_big, w, b = make_inputs(rows, hidden + pad, dtype, "same", seed=11)
    w, b = w[:hidden].contiguous(), b[:hidden].contiguous()
    x, r = x_big[:, :hidden], r_big[:, 3 : 3 + hidden]
    assert x.stride(0) == hidden + pad and not x.is_contiguous()
    sentinel = -7.0
    out_big = torch.full((rows + 1, hidden + 2 * pad), sentinel, dtype=dtype)
    res_out_big = torch.full((rows + 1, hidden + 2 * pad), sentinel, dtype=dtype)
    out, res_out = out_big[:rows, pad : pad + hidden], res_out_big[:rows, 1 : 1 + hidden]
    layer_norm_fwd(out, x, w, b, EPS, residual=r, residual_out=res_out)
    assert torch.equal(res_out, x + r)
    assert_close_2x(out, round_sum(x, r), w, b, EPS)
    out_big[:rows, pad : pad + hidden] = sentinel
    res_out_big[:rows, 1 : 1 + hidden] = sentinel
    assert (out_big == sentinel).all() and (res_out_big == sentinel).all()
    assert torch.equal(x_big, make_inputs(rows, hidden + pad, dtype, "same", seed=11)[0])


@pytest.mark.parametrize("hidden", [1, 577, LOOPED_HIDDEN])
def test_in_place_aliasing(hidden):
    """x <- norm(x + residual), residual <- x + residual, as vLLM's fused_add_rms_norm."""
    rows = 3 if hidden < 1000 else 2
    x, r, w, b = make_inputs(rows, hidden, torch.bfloat16, "same", seed=13)
    expect_out, expect_res = run(x, w, b, r)
    layer_norm_fwd(x, x, w, b, EPS, residual=r, residual_out=r)
    assert torch.equal(r, expect_res)
    assert torch.equal(x, expect_out)
    x2, _, _, _ = make_inputs(rows, hidden, torch.float16, None, seed=17)
    expect, _ = run(x2, w.half(), b.half())
    layer_norm_fwd(x2, x2, w.half(), b.half(), EPS)
    assert torch.equal(x2, expect)


def test_deterministic():
    x, r, w, b = make_inputs(7, 577, torch.bfloat16, "same", seed=19)
    a, _ = run(x, w, b, residual=r)
    c, _ = run(x, w, b, residual=r)
    assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------
# Misuse: cheap invariants raise ValueError


def test_rejects_bad_inputs():
    x = torch.randn(4, 16)
    out = torch.empty(4, 16)
    with pytest.raises(ValueError, match="inner stride"):
        layer_norm_fwd(out, torch.randn(16, 4).t(), None, None, EPS)
    with pytest.raises(ValueError, match="inner stride"):
        layer_norm_fwd(torch.empty(16, 4).t(), x, None, None, EPS)
    with pytest.raises(ValueError, match="together"):
        layer_norm_fwd(out, x, None, None, EPS, residual_out=x)
    with pytest.raises(ValueError, match="dtype"):
        layer_norm_fwd(out, x.double(), None, None, EPS)
    with pytest.raises(ValueError, match="dtype"):
        layer_norm_fwd(out.bfloat16(), x, None, None, EPS)
    with pytest.raises(ValueError, match="weight"):
        layer_norm_fwd(out, x, torch.ones(17), None, EPS)
    with pytest.raises(ValueError, match="bias"):
        layer_norm_fwd(out, x, None, torch.ones(8, 2)[:, 0], EPS)
    with pytest.raises(ValueError, match="bias"):
        layer_norm_fwd(out.half(), x.half(), None, torch.ones(16, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="2-D"):
        layer_norm_fwd(out, x.view(2, 2, 16), None, None, EPS)
    with pytest.raises(ValueError, match="residual"):
        layer_norm_fwd(out, x, None, None, EPS, residual=x.half(), residual_out=x.half())
    with pytest.raises(ValueError, match="overlap"):
        layer_norm_fwd(out, x, None, None, EPS, residual=x, residual_out=torch.empty(40).as_strided((4, 16), (8, 1)))
