"""kernels/rms_norm.py under the Triton interpreter (TRITON_INTERPRET=1, set in conftest),
on CPU tensors, vs an independent fp64 reference written here.

Tolerance (ARCHITECTURE.md): kernel error vs the fp64 reference <= 2x the error of torch's own
computation (F.rms_norm, or the HF LlamaRMSNorm formula for llama_cast) vs that reference,
plus a floor of one fp32 ulp at the output's magnitude (torch sometimes lands a lucky half
ulp on fp32 outputs; the floor is negligible for fp16 / bf16 outputs) and, for llama_cast,
half an x-dtype ulp (the specified intermediate rounding; see assert_close_2x).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ringfuse.kernels import rms_norm as triton_rms_norm

from .triton_helpers import interp_only

rms_norm_fwd = triton_rms_norm.rms_norm_fwd

# CPU tensors only run under the interpreter; with TRITON_INTERPRET=0 (e.g. a GPU run of
# the suite) these tests skip and the GPU tests of the ops cover the compiled kernels
pytestmark = [
    interp_only,
    # rounds the interpreter's fp32 -> bf16 casts as GPUs do (tests/kernels/conftest.py)
    pytest.mark.usefixtures("interpreter_bf16_round_to_nearest_even"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = (1, 3, 7)
EPS = 1e-6
LOOPED_HIDDEN = 2 * triton_rms_norm.MAX_ROW_BLOCK + 11  # > MAX_ROW_BLOCK, odd, partial last chunk




# ---------------------------------------------------------------------------------------
# Reference and baseline


def round_sum(x, residual):
    """s = round_x(x + residual), the add done in fp32."""
    return (x.float() + residual.float()).to(x.dtype)


def reference(s, weight, eps):
    """fp64 RMSNorm of s (no intermediate rounding: the exact value both modes approximate)."""
    s64 = s.double()
    rstd = torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps)
    y = s64 * rstd
    return y * weight.double() if weight is not None else y


def torch_baseline(s, weight, eps, llama_cast, out_dtype):
    """Torch eager in the inputs' dtypes: F.rms_norm (torch mode) or HF LlamaRMSNorm."""
    if llama_cast:
        hs = s.float()
        hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + eps)
        y = hs.to(s.dtype)
        if weight is not None:
            y = weight * y
        return y.to(out_dtype)
    cdt = torch.promote_types(s.dtype, out_dtype)
    if weight is not None:
        cdt = torch.promote_types(cdt, weight.dtype)
    w = weight.to(cdt) if weight is not None else None
    return F.rms_norm(s.to(cdt), (s.shape[-1],), w, eps).to(out_dtype)


def assert_close_2x(out, s, weight, eps, llama_cast):
    ref = reference(s, weight, eps)
    base = torch_baseline(s, weight, eps, llama_cast, out.dtype)
    assert out.dtype == base.dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    err_torch = (base.double() - ref).abs().max().item()
    # one fp32 ulp at the output's magnitude: the precision of the fp32 math both share
    # (for fp32 outputs torch's max error is sometimes a lucky half ulp; negligible for
    # fp16 / bf16 outputs)
    floor = torch.finfo(torch.float32).eps * ref.abs().max().item()
    if llama_cast:
        # plus the half x-dtype ulp the specified intermediate rounding round_x(s * rstd)
        # may cost: on tiny rows (hidden 1, 7) torch's extra final rounding sometimes
        # cancels it by luck, and the max over a handful of elements is all luck
        floor += 0.5 * torch.finfo(s.dtype).eps * ref.abs().max().item()
    assert err <= 2 * err_torch + floor, f"kernel error {err:.3e} > 2 x torch error {err_torch:.3e} (+{floor:.1e})"


def make_inputs(rows, hidden, dtype, weight_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    r = torch.randn(rows, hidden, generator=g).to(dtype)
    if weight_kind is None:
        w = None
    else:
        w = (1.0 + 0.5 * torch.randn(hidden, generator=g)).to(dtype if weight_kind == "same" else torch.float32)
    return x, r, w


def run(x, w, llama_cast=False, residual=None, out_dtype=None):
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype)
    res_out = None if residual is None else torch.empty_like(residual)
    rms_norm_fwd(out, x, w, EPS, llama_cast=llama_cast, residual=residual, residual_out=res_out)
    return out, res_out


# ---------------------------------------------------------------------------------------
# Accuracy over dtypes x odd shapes x options

CASES = [
    (dtype, wk, out_fp32, res, llama)
    for dtype in DTYPES
    for wk in ((None, "same") if dtype == torch.float32 else (None, "same", "fp32"))
    for out_fp32 in ((False,) if dtype == torch.float32 else (False, True))
    for res in (False, True)
    for llama in ((False,) if dtype == torch.float32 else (False, True))
]


def case_id(c):
    dtype, wk, out_fp32, res, llama = c
    return f"{str(dtype)[6:]}-w{wk}-out{'fp32' if out_fp32 else 'x'}-res{int(res)}-{'llama' if llama else 'torch'}"


@pytest.mark.parametrize("hidden", [1, 7, 64, 577])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(hidden, case):
    dtype, wk, out_fp32, has_res, llama = case
    for rows in ROWS:
        x, r, w = make_inputs(rows, hidden, dtype, wk, seed=rows * 1000 + hidden)
        residual = r if has_res else None
        out, res_out = run(x, w, llama, residual, torch.float32 if out_fp32 else None)
        s = x
        if has_res:
            s = round_sum(x, r)
            assert torch.equal(res_out, x + r), "residual_out must be x + residual rounded to x's dtype"
        assert_close_2x(out, s, w, EPS, llama)


@pytest.mark.parametrize(
    "dtype, llama",
    [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "fp16", "bf16", "bf16-llama"],
)
@pytest.mark.parametrize("has_res", [False, True])
def test_looped_large_hidden(dtype, llama, has_res):
    hidden = LOOPED_HIDDEN
    kernel, block, _ = triton_rms_norm._pick(hidden)
    assert kernel is triton_rms_norm._rms_norm_fwd_looped_kernel and hidden % block != 0
    x, r, w = make_inputs(2, hidden, dtype, "fp32" if dtype == torch.bfloat16 else "same", seed=7)
    residual = r if has_res else None
    out, res_out = run(x, w, llama, residual)
    s = x
    if has_res:
        s = round_sum(x, r)
        assert torch.equal(res_out, x + r)
    assert_close_2x(out, s, w, EPS, llama)


def test_hidden_65536():
    x, r, w = make_inputs(1, 65536, torch.bfloat16, "same", seed=3)
    out, res_out = run(x, w, residual=r)
    assert torch.equal(res_out, x + r)
    assert_close_2x(out, round_sum(x, r), w, EPS, False)


def test_large_offset_values():
    """Rows with a large common offset: mean(s^2) must not lose the small part."""
    x, r, w = make_inputs(3, 577, torch.float32, "same", seed=5)
    x = x * 1e-3 + 1e3
    out, _ = run(x, w)
    assert_close_2x(out, x, w, EPS, False)


def test_zero_rows_launch_nothing():
    x = torch.empty(0, 64)
    out = torch.empty(0, 64)
    rms_norm_fwd(out, x, None, EPS)


def test_all_zero_row():
    """rstd = 1/sqrt(eps): finite, output exactly zero."""
    x = torch.zeros(2, 577, dtype=torch.bfloat16)
    out, _ = run(x, torch.ones(577, dtype=torch.bfloat16))
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------
# Layouts: strided rows, writes stay inside [rows, hidden], aliasing


@pytest.mark.parametrize("hidden", [7, 577, LOOPED_HIDDEN])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_strided_rows_and_untouched_padding(hidden, dtype):
    rows, pad = (3, 13) if hidden < 1000 else (2, 5)
    x_big, r_big, w = make_inputs(rows, hidden + pad, dtype, "same", seed=11)
    w = w[:hidden].contiguous()
    x, r = x_big[:, :hidden], r_big[:, 3 : 3 + hidden]
    assert x.stride(0) == hidden + pad and not x.is_contiguous()
    sentinel = -7.0
    out_big = torch.full((rows + 1, hidden + 2 * pad), sentinel, dtype=dtype)
    res_out_big = torch.full((rows + 1, hidden + 2 * pad), sentinel, dtype=dtype)
    out, res_out = out_big[:rows, pad : pad + hidden], res_out_big[:rows, 1 : 1 + hidden]
    rms_norm_fwd(out, x, w, EPS, residual=r, residual_out=res_out)
    assert torch.equal(res_out, x + r)
    assert_close_2x(out, round_sum(x, r), w, EPS, False)
    # everything outside the [rows, hidden] windows is untouched
    out_big[:rows, pad : pad + hidden] = sentinel
    res_out_big[:rows, 1 : 1 + hidden] = sentinel
    assert (out_big == sentinel).all() and (res_out_big == sentinel).all()
    # and the inputs were not written
    assert torch.equal(x_big, make_inputs(rows, hidden + pad, dtype, "same", seed=11)[0])


@pytest.mark.parametrize("hidden", [1, 577, LOOPED_HIDDEN])
@pytest.mark.parametrize("llama", [False, True])
def test_in_place_aliasing(hidden, llama):
    """vLLM's fused_add_rms_norm: x <- norm(x + residual), residual <- x + residual."""
    rows = 3 if hidden < 1000 else 2
    x, r, w = make_inputs(rows, hidden, torch.bfloat16, "same", seed=13)
    expect_out, expect_res = run(x, w, llama, r)
    rms_norm_fwd(x, x, w, EPS, llama_cast=llama, residual=r, residual_out=r)
    assert torch.equal(r, expect_res)
    assert torch.equal(x, expect_out)
    # without a residual: out is x
    x2, _, _ = make_inputs(rows, hidden, torch.float16, None, seed=17)
    expect, _ = run(x2, w.half(), llama)
    rms_norm_fwd(x2, x2, w.half(), EPS, llama_cast=llama)
    assert torch.equal(x2, expect)


def test_deterministic():
    x, r, w = make_inputs(7, 577, torch.bfloat16, "same", seed=19)
    a, _ = run(x, w, residual=r)
    b, _ = run(x, w, residual=r)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Misuse: cheap invariants raise ValueError


def test_rejects_bad_inputs():
    x = torch.randn(4, 16)
    out = torch.empty(4, 16)
    with pytest.raises(ValueError, match="inner stride"):
        rms_norm_fwd(out, torch.randn(16, 4).t(), None, EPS)
    with pytest.raises(ValueError, match="inner stride"):
        rms_norm_fwd(torch.empty(16, 4).t(), x, None, EPS)
    with pytest.raises(ValueError, match="together"):
        rms_norm_fwd(out, x, None, EPS, residual=x)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm_fwd(out, x.double(), None, EPS)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm_fwd(out.half(), x, None, EPS)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_fwd(out, x, torch.ones(15), EPS)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_fwd(out.half(), x.half(), torch.ones(16, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="2-D"):
        rms_norm_fwd(out, x.view(2, 2, 16), None, EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_fwd(out, x, None, EPS, residual=x.half(), residual_out=x.half())
    with pytest.raises(ValueError, match="overlap"):
        rms_norm_fwd(torch.empty(40).as_strided((4, 16), (8, 1)), x, None, EPS)
