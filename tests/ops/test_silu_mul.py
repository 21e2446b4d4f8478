"""ringfuse.ops.silu_mul on CPU (AVX2 and scalar) vs an fp64 reference with ARCHITECTURE.md's
tolerance rule (2x torch's own error + a rounding floor), special values as torch, layouts,
the documented torch fallback, torch.compile and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from ringfuse import _C
from ringfuse.ops import silu_mul

from .isa import at_avx2_and_avx512

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def torch_silu_mul(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def torch_gelu_tanh_mul(x):
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (1, 2 * 1536), (3, 2 * 7), (17, 2 * 100), (2, 5, 2 * 33)], ids=str)
def test_matches_reference(avx512_isa, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (4 * torch.randn(shape, generator=g)).to(dtype)
    got = silu_mul(x)
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-1] // 2)
    ref = torch_silu_mul(x.double())
    err = float((got.double() - ref).abs().max())
    terr = float((torch_silu_mul(x).double() - ref).abs().max())
    floor = torch.finfo(dtype).eps / 2 * float(ref.abs().max())
    assert err <= 2 * terr + floor, f"error {err:.3g} vs torch {terr:.3g} (floor {floor:.3g})"


def _ulps(got, ref, dtype):
    """|got - ref| in units of the last place of ref rounded to dtype."""
    r = ref.to(dtype)
    ulp = (torch.nextafter(r, torch.full_like(r, float("inf"))).double() - r.double()).abs()
    return (got.double() - ref).abs() / ulp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_documented_ulp_bounds(avx512_isa, dtype):
    """What the README states, element by element, at the d of a 7B MLP: fp32 output within 3
    ulp of the exact value (the fp32 exp polynomial's error; torch's own is about the same);
    fp16 / bf16 output is the fp32 value rounded once, so within 1 ulp of the exact value."""
    d = 13824
    x = (4 * torch.randn(8, 2 * d, generator=torch.Generator().manual_seed(7))).to(dtype)
    xd = x.double()
    ref = xd[:, :d] / (1 + torch.exp(-xd[:, :d])) * xd[:, d:]
    ulps = _ulps(silu_mul(x), ref, dtype)
    bound = 3.0 if dtype == torch.float32 else 1.0
    assert float(ulps.max()) < bound, f"{float(ulps.max()):.3f} ulp"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_as_torch(avx512_isa, dtype):
    """NaN propagates; -inf gives NaN, +inf gives inf, far-negative gates give 0 (exp(-a)
    overflows), including the band just past exp's saturation."""
    gate = torch.tensor([float("-inf"), float("inf"), float("nan"), -200.0, -100.0, -88.8, -88.7, -88.5, -87.0,
                         -3.0, -0.0, 0.0, 1.0, 3.0, 20.0, 100.0, 5.0])  # fmt: skip
    up = torch.tensor([2.0, 2.0, 2.0, -1.5, -100.0, 3.0, 3.0, -88.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0,
                       float("nan")])  # fmt: skip
    x = torch.cat([gate, up])[None].to(dtype)
    got, want = silu_mul(x), torch_silu_mul(x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=2 * torch.finfo(dtype).eps, atol=1e-30)


def test_layouts_and_threads():
    big = torch.randn(6, 300)
    x = big[:, :200]  # strided rows: used in place
    assert torch.equal(silu_mul(x), silu_mul(x.contiguous()))
    xt = torch.randn(200, 6).T  # inner stride 6: copied
    assert torch.equal(silu_mul(xt), silu_mul(xt.contiguous()))
    assert silu_mul(torch.empty(0, 8)).shape == (0, 4)
    x = torch.randn(512, 2 * 1536)  # big enough for OpenMP
    one = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = silu_mul(x)
    finally:
        torch.set_num_threads(one)
    assert torch.equal(a, silu_mul(x))


def _gated_ops():
    from ringfuse.ops import gelu_tanh_mul

    return {"silu_mul": (silu_mul, torch_silu_mul), "gelu_tanh_mul": (gelu_tanh_mul, torch_gelu_tanh_mul)}


@pytest.mark.parametrize("op", ["silu_mul", "gelu_tanh_mul"])
def test_fallbacks_and_compile(op):
    ours, reference = _gated_ops()[op]
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(ours(x), reference(x))  # float64: torch
    xg = torch.randn(3, 16, requires_grad=True)
    y = ours(xg)  # autograd: torch
    y.sum().backward()
    assert xg.grad is not None and torch.allclose(y, reference(xg))
    x = torch.randn(4, 16)
    f = torch.compile(ours, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), ours(x))
    torch.library.opcheck(getattr(torch.ops.ringfuse, op), (x,))


def test_bad_inputs():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        silu_mul([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        silu_mul(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"even, non-zero last dim, got shape \(2, 5\)"):
        silu_mul(torch.ones(2, 5))
    with pytest.raises(ValueError, match="even, non-zero last dim"):
        silu_mul(torch.ones(2, 0))
    with pytest.raises(ValueError, match="even, non-zero last dim"):
        silu_mul(torch.tensor(1.0))
    with pytest.raises(ValueError, match="row strides must be"):
        _C.silu_mul(1, 4, 1, 4, 2, 4, 0, 1)
    with pytest.raises(ValueError, match="null pointer"):
        _C.silu_mul(0, 4, 0, 8, 2, 4, 0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_runs_the_triton_kernel(dtype):
    """CUDA tensors take kernels/silu_mul.py: both activations vs fp64 with the tolerance
    rule (torch's error measured on the GPU), a leading-dims input with strided rows."""
    from ringfuse.ops import gelu_tanh_mul

    g = torch.Generator().manual_seed(5)
    big = (4 * torch.randn(3, 5, 2 * 2500 + 8, generator=g)).to(dtype)
    x = big[..., : 2 * 2500].cuda()
    for ours, theirs in ((silu_mul, torch_silu_mul), (gelu_tanh_mul, torch_gelu_tanh_mul)):
        got = ours(x)
        assert got.is_cuda and got.shape == (3, 5, 2500) and got.dtype == dtype
        ref = theirs(x.double())
        err = float((got.double() - ref).abs().max())
        terr = float((theirs(x).double() - ref).abs().max())
        floor = torch.finfo(dtype).eps / 2 * float(ref.abs().max())
        assert err <= 2 * terr + floor, f"{ours.__name__} {dtype}: error {err:.3g} vs torch {terr:.3g}"


# ---- GeGLU with GELU's tanh approximation (Gemma) -----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (1, 2 * 1536), (3, 2 * 7), (17, 2 * 100), (2, 5, 2 * 33)], ids=str)
def test_gelu_tanh_mul_matches_reference(avx512_isa, dtype, shape):
    """Against fp64 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3))) * up, ARCHITECTURE.md's tolerance rule."""
    from ringfuse.ops import gelu_tanh_mul

    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = (4 * torch.randn(shape, generator=g)).to(dtype)
    got = gelu_tanh_mul(x)
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-1] // 2)
    ref = torch_gelu_tanh_mul(x.double())
    err = float((got.double() - ref).abs().max())
    terr = float((torch_gelu_tanh_mul(x).double() - ref).abs().max())
    floor = torch.finfo(dtype).eps / 2 * float(ref.abs().max())
    assert err <= 2 * terr + floor, f"error {err:.3g} vs torch {terr:.3g} (floor {floor:.3g})"
    assert not torch.equal(got, silu_mul(x)) or shape == (1, 2)  # the other activation


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_tanh_mul_special_values_as_torch(avx512_isa, dtype):
    """NaN propagates, -inf gives NaN (as torch: -inf * 0), +inf gives inf, far-negative gates
    0 (exp overflows; a^3 overflows first past ~1e13), large positive gates pass through."""
    from ringfuse.ops import gelu_tanh_mul

    gate = torch.tensor([float("-inf"), float("inf"), float("nan"), -1e20, -200.0, -12.0, -9.0, -3.0, -0.0, 0.0,
                         0.5, 3.0, 20.0, 1e20])  # fmt: skip
    up = torch.tensor([2.0, 2.0, 2.0, 1.5, -100.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0, -2.0, 1.0, 0.5])
    x = torch.cat([gate, up])[None].to(dtype)
    got, want = gelu_tanh_mul(x), torch_gelu_tanh_mul(x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    # finite values against fp64 in the exp form (1 + tanh(u) = 2 / (1 + exp(-2 u))): torch's
    # 1 + tanh(u) cancels to 0 from about a = -9 on (even in fp64), where the exact value is tiny
    xd = x.double()
    a, u = xd[:, : gate.numel()], 0.7978845608028654 * (xd[:, : gate.numel()] + 0.044715 * xd[:, : gate.numel()] ** 3)
    ref = (a / (1 + torch.exp(-2 * u)) * xd[:, gate.numel() :]).to(dtype).double()
    torch.testing.assert_close(got[finite].double(), ref[finite], rtol=4 * torch.finfo(dtype).eps, atol=1e-30)


def test_gelu_tanh_mul_layouts_and_errors():
    from ringfuse.ops import gelu_tanh_mul

    big = torch.randn(6, 300)
    assert torch.equal(gelu_tanh_mul(big[:, :200]), gelu_tanh_mul(big[:, :200].contiguous()))  # strided rows
    with pytest.raises(ValueError, match=r"gelu_tanh_mul: x must be \[..., 2 d\]"):
        gelu_tanh_mul(torch.ones(2, 5))
    with pytest.raises(TypeError, match="gelu_tanh_mul: x must have dtype"):
        gelu_tanh_mul(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="activation must be 0 .silu. or 1 .gelu_tanh."):
        _C.silu_mul(1, 4, 1, 8, 2, 4, 0, 1, 7)


@pytest.mark.skipif(not _C.build_info()["cpu_has_avx512_vnni"], reason="needs AVX-512")
@pytest.mark.parametrize("op", ["silu_mul", "gelu_tanh_mul"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avx512_rows_give_the_avx2_bits(op, dtype):
    """The 16-lane rows (exp16 = exp8 at 16 lanes) give the AVX2 rows' bits, for every d
    modulo 16 and across the special values (NaN, +-inf, saturating gates)."""
    import ringfuse.ops as ops

    fn = getattr(ops, op)
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -100.0, -88.8, -88.5, 88.0, -0.0])
    for d in (1, 8, 11, 16, 24, 35, 1536):
        x = 6 * torch.randn(3, 2 * d, generator=g)
        x.view(-1)[: min(x.numel(), special.numel())] = special[: x.numel()]
        x = x.to(dtype)
        bits = torch.int16 if dtype != torch.float32 else torch.int32  # NaNs compared by their bits
        narrow, wide = at_avx2_and_avx512(lambda: fn(x))
        assert torch.equal(narrow.view(bits), wide.view(bits)), d
