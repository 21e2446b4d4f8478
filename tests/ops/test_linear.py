"""ringfuse.ops.linear on CPU (AVX2 and scalar) vs an fp64 reference with ARCHITECTURE.md's tolerance
rule, layouts, thread-count determinism, the documented F.linear fallback and bad inputs.
M up to ROW_KERNEL_MAX_M (16) runs the per-row kernel, more rows the packed-panel GEMM."""

import pytest
import torch
import torch.nn.functional as F

from ringfuse import _C
from ringfuse.ops import linear, linear_path
from ringfuse.ops.linear import ROW_KERNEL_MAX_M

from .isa import at_avx2_and_avx512

# per-row kernel up to 16; the GEMM from 17 (40: several blocks of 12 / 6 rows and a
# partial one at both ISA levels)
MS = [1, 2, 3, 4, 5, 8, 16, 17, 40]
# (N, K): N below / not a multiple of the 8-row block, K not a multiple of 8 / 16 / 32, K
# over several 64-k chunks and groups of 4 (4100)
SHAPES = [(1, 1), (7, 9), (33, 577), (64, 40), (130, 1000), (20, 4100)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def assert_close_to_reference(got, x, w, b=None):
    """Error vs fp64 <= 2x torch's own same-dtype error (fp32 math rounded to the output
    dtype where torch has no mixed-dtype linear) + the output dtype's rounding unit at the
    output's scale bound (for the few-output cases where torch rounds luckily)."""
    out_dtype = x.dtype
    assert got.dtype == out_dtype and got.shape == (*x.shape[:-1], w.shape[0])
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    if w.dtype == x.dtype and (b is None or b.dtype == x.dtype):
        theirs = F.linear(x, w, b)
    else:
        theirs = F.linear(x.float(), w.float(), None if b is None else b.float()).to(out_dtype)
    bound = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    floor = torch.finfo(out_dtype).eps / 2 * float(bound.max()) if bound.numel() else 0.0
    err = float((got.double() - ref).abs().max()) if ref.numel() else 0.0
    terr = float((theirs.double() - ref).abs().max()) if ref.numel() else 0.0
    assert err <= 2 * terr + floor, f"error {err:.3g} vs torch {terr:.3g} (floor {floor:.3g})"


@pytest.mark.parametrize("bias", [None, "fp32", "bf16"])
@pytest.mark.parametrize("wdt", list(DTYPES))
@pytest.mark.parametrize("xdt", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(isa, shape, xdt, wdt, bias):
    n, k = shape
    w = rand((n, k), n * 31 + k, DTYPES[wdt])
    b = None if bias is None else rand((n,), n, DTYPES[bias])
    for m in MS:
        x = rand((m, k), m * 7 + k, DTYPES[xdt])
        assert_close_to_reference(linear(x, w, b), x, w, b)


@pytest.mark.parametrize("xdt", list(DTYPES))
def test_leading_dims_and_1d(isa, xdt):
    w, b = rand((19, 70), 1), rand((19,), 2)
    x = rand((2, 3, 70), 3, DTYPES[xdt])
    assert_close_to_reference(linear(x, w, b), x, w, b)
    x1 = rand((70,), 4, DTYPES[xdt])
    got = linear(x1, w, b)
    assert got.shape == (19,)
    assert_close_to_reference(got, x1, w, b)


def test_strided_layouts(isa):
    big_w = rand((45, 300), 5)
    w = big_w[:, 7:207]  # rows 300 apart, K = 200
    big_x = rand((6, 260), 6)
    x = big_x[:, 50:250]  # rows 260 apart
    b = rand((90,), 7)[::2]  # non-unit stride bias
    got = linear(x, w, b)
    assert_close_to_reference(got, x, w, b)
    assert torch.equal(got, linear(x.contiguous(), w.contiguous(), b.contiguous()))
    wt = rand((200, 45), 8).t()  # inner stride 45: copied to contiguous first
    assert torch.equal(linear(x, wt, b), linear(x, wt.contiguous(), b))
    xt = rand((200, 6), 9).t()
    assert torch.equal(linear(xt, w), linear(xt.contiguous(), w))
    x3 = rand((4, 5, 200), 10).transpose(0, 1)  # leading dims that do not collapse: copied
    assert torch.equal(linear(x3, w, b), linear(x3.contiguous(), w, b))
    xe = rand((1, 200), 11).expand(3, 200)  # overlapping rows (stride 0)
    assert torch.equal(linear(xe, w), linear(xe.contiguous(), w))
    w_bf = rand((45, 300), 12, torch.bfloat16)[:, 7:207]
    assert torch.equal(linear(x, w_bf), linear(x, w_bf.contiguous()))


@pytest.mark.parametrize("wdt", list(DTYPES))
def test_threads_bitwise_equal(isa, wdt):
    w, b = rand((1001, 577), 13, DTYPES[wdt]), rand((1001,), 14)
    prev = torch.get_num_threads()
    for m in (1, 3, 8, 40):
        x = rand((m, 577), 15 + m)
        try:
            torch.set_num_threads(1)
            one = linear(x, w, b)
            torch.set_num_threads(2)
            two = linear(x, w, b)
        finally:
            torch.set_num_threads(prev)
        assert torch.equal(one, two)
        assert torch.equal(one, linear(x, w, b))  # run to run


@pytest.mark.skipif(not _C.build_info()["cpu_has_avx512_vnni"], reason="needs AVX-512")
@pytest.mark.parametrize("wdt", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_avx512_blocks_give_the_avx2_bits(shape, wdt):
    """At the avx512vnni level the 8-row blocks hold two weight rows per zmm register; each
    lane keeps its AVX2 lane's products and order, so every M gives the AVX2 path's bits."""
    n, k = shape
    w, b = rand((n, k), n + k, DTYPES[wdt]), rand((n,), n)
    for m in MS:
        for xdt in DTYPES.values():
            x = rand((m, k), m + k, xdt)
            narrow, wide = at_avx2_and_avx512(lambda: linear(x, w, b))
            assert torch.equal(narrow, wide), (m, xdt)


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [7, 300, 577, 1100])
def test_row_blocking_does_not_change_a_row(avx512_isa, wdt, k):
    """Each output's reduction order is fixed: row r of an M-row call (weight rows one by one
    against up to 4 rows of x; 8-row blocks past 4 rows) equals the 1-row call, at every ISA
    level."""
    w, b = rand((37, k), 16).to(wdt), rand((37,), 17)
    x = rand((8, k), 18)
    for m in (2, 3, 4, 5, 8):
        full = linear(x[:m], w, b)
        for r in range(m):
            assert torch.equal(full[r], linear(x[r], w, b)), (m, r)


def test_gemm_rows_do_not_depend_on_the_other_rows(isa):
    """Past ROW_KERNEL_MAX_M rows each output of the GEMM sums its k products in k order from
    zero: a row's bits do not depend on M or on where the row falls in a register block; the
    first rows differ from the per-row kernel's (another order), within tolerance."""
    w, b = rand((70, 300), 40), rand((70,), 41)
    x = rand((53, 300), 42)
    full = linear(x, w, b)
    for m in (ROW_KERNEL_MAX_M + 1, 30, 41):
        assert torch.equal(linear(x[:m], w, b), full[:m]), m
    shifted = linear(x[5:], w, b)  # every row in another block position
    assert torch.equal(shifted, full[5:])
    assert_close_to_reference(full, x, w, b)


def test_gemm_strided_and_tails(isa):
    """The GEMM path with weight rows further apart than K, x rows apart, N not a multiple
    of the 16 / 32 packed columns, K not a multiple of 8, and bf16 x / out."""
    big_w = rand((37, 140), 43)
    w = big_w[:, 3:134]  # K = 131, rows 140 apart
    x = rand((29, 150), 44)[:, 10:141]
    got = linear(x, w)
    assert_close_to_reference(got, x, w)
    assert torch.equal(got, linear(x.contiguous(), w.contiguous()))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert_close_to_reference(linear(xb, wb, rand((37,), 45).bfloat16()), xb, wb, rand((37,), 45).bfloat16())


def test_empty_and_k_zero(isa):
    w, b = rand((5, 16), 19), rand((5,), 20)
    assert torch.equal(linear(torch.empty(20, 0), torch.empty(5, 0), b), b.expand(20, 5))  # GEMM-sized M
    assert linear(torch.empty(0, 16), w, b).shape == (0, 5)
    assert linear(torch.empty(2, 0, 16), w).shape == (2, 0, 5)
    assert linear(rand((3, 16), 21), torch.empty(0, 16)).shape == (3, 0)
    assert torch.equal(linear(torch.empty(3, 0), torch.empty(5, 0), b), b.expand(3, 5))
    assert torch.equal(linear(torch.empty(3, 0), torch.empty(5, 0)), torch.zeros(3, 5))


@pytest.mark.parametrize("m", [3, 20], ids=["row-kernel", "gemm"])
def test_nan_and_inf_propagate(isa, m):
    w = rand((20, 33), 22)
    x = rand((m, 33), 23)
    x[1, 4] = float("nan")
    x[2, 32] = float("inf")  # in the K tail
    got = linear(x, w)
    assert torch.isnan(got[1]).all()
    assert torch.equal(torch.isinf(got[2]) | torch.isnan(got[2]), torch.ones(20, dtype=torch.bool))
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[3:]).all()


def test_fallbacks():
    w, b = rand((11, 24), 24), rand((11,), 25)
    x = rand((3, 24), 26)
    assert linear_path(x, w, b) == "kernel"
    assert linear_path(x, w.bfloat16(), b.bfloat16()) == "kernel"
    for dt in (torch.float16, torch.float64):
        assert linear_path(x.to(dt), w.to(dt)).startswith("F.linear: dtypes")
        assert torch.equal(linear(x.to(dt), w.to(dt), b.to(dt)), F.linear(x.to(dt), w.to(dt), b.to(dt)))
    assert torch.equal(linear(x.half(), w, b), F.linear(x.half(), w.half(), b.half()))  # weight.to(x.dtype)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    assert linear_path(xg, wg, b) == "F.linear: autograd (an input requires grad)"
    y = linear(xg, wg, b)
    y.sum().backward()
    assert torch.allclose(xg.grad, w.sum(0).expand(3, 24)) and torch.allclose(wg.grad, x.sum(0).expand(11, 24))
    with torch.no_grad():
        assert linear_path(xg, wg, b) == "kernel"
        assert not linear(xg, wg, b).requires_grad


def test_torch_compile_fullgraph():
    w, b = rand((10, 40), 27), rand((10,), 28)
    x = rand((2, 3, 40), 29)
    f = torch.compile(lambda t: linear(t, w, b), fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), linear(x, w, b))
    torch.library.opcheck(torch.ops.ringfuse.linear, (x, w, b))
    torch.library.opcheck(torch.ops.ringfuse.linear, (x.bfloat16(), w, None))


def test_bad_inputs():
    x, w, b = rand((2, 8), 30), rand((3, 8), 31), rand((3,), 32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        linear([1.0] * 8, w)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        linear(x, None)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None"):
        linear(x, w, 1.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        linear(x.int(), w)
    with pytest.raises(TypeError, match="weight must have dtype .* use ops.int8_weight_only_linear"):
        linear(x, w.to(torch.int8))
    with pytest.raises(TypeError, match="bias must have dtype"):
        linear(x, w, b.long())
    with pytest.raises(TypeError, match="x must have dtype"):
        linear(x.to(torch.complex64), w)
    with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K\]"):
        linear(x, w[0])
    with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K\]"):
        linear(x, w[None])
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match=r"x's last dim \(7\) must equal K = 8"):
        linear(x[:, :7], w)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        linear(x, w, rand((4,), 33))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        linear(x, w, b[None])
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        linear(x, w.to("meta"))
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        linear(x, w, b.to("meta"))


def test_cpp_boundary_checks():
    x, w = rand((2, 8), 34), rand((3, 8), 35)
    out = torch.empty(2, 3)
    args = dict(out=out.data_ptr(), out_stride=3, out_dtype=0, x=x.data_ptr(), x_stride=8, x_dtype=0,
                w=w.data_ptr(), w_stride=8, w_dtype=0, bias=0, bias_dtype=0, m=2, n=3, k=8, num_threads=1)
    _C.linear(**args)
    assert torch.allclose(out, x @ w.T)
    for bad, msg in [(dict(w_stride=7), "row stride < k"), (dict(x_stride=7), "row stride < k"),
                     (dict(out_stride=2), "out_stride < n"), (dict(x=0), "null x / w"), (dict(w=0), "null x / w"),
                     (dict(out=0), "null out"), (dict(m=-1), "must be >= 0"), (dict(w_dtype=1), "w must be"),
                     (dict(x_dtype=3), "x and out must be"), (dict(out_dtype=4), "x and out must be"),
                     (dict(bias=1, bias_dtype=5), "bias must be")]:
        with pytest.raises(ValueError, match=msg):
            _C.linear(**{**args, **bad})


@pytest.mark.gpu
def test_cuda_falls_back_to_f_linear():
    x, w, b = rand((3, 64), 36).cuda(), rand((10, 64), 37).cuda(), rand((10,), 38).cuda()
    assert linear_path(x, w, b).startswith("F.linear: x is on cuda")
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(linear(x, w.bfloat16(), b), F.linear(x, w.bfloat16().float(), b))


# ---- prepare_linear ----------------------------------------------------------------------


@pytest.mark.parametrize("wdt", list(DTYPES))
@pytest.mark.parametrize("bias", [None, "fp32", "fp16"])
def test_prepared_equals_linear(wdt, bias):
    """The prepared op gives linear's bits on its direct path and on every fallback."""
    from ringfuse.ops import prepare_linear

    w = rand((19, 70), 30, DTYPES[wdt])
    b = None if bias is None else rand((19,), 31, torch.float32 if bias == "fp32" else torch.float16)
    p = prepare_linear(w, b)
    x = rand((5, 70), 32)
    cases = [x, x[:1], x[:0], x.bfloat16(),  # direct
             x.half(), x.double(), x[:, None, :], x.T.contiguous().T, x[:, :70].expand(5, 70),  # full op
             torch.randn(3, 2, 70), x.clone().requires_grad_()]  # fmt: skip
    for xi in cases:
        with torch.no_grad() if not xi.requires_grad else torch.enable_grad():
            want = linear(xi, w, b)
        assert torch.equal(p(xi).detach(), want.detach()), (xi.shape, xi.dtype, xi.stride())
    rows = torch.randn(1, 70).expand(4, 70)  # row stride 0: the full op copies it
    assert torch.equal(p(rows), linear(rows, w, b))
    shared = torch.randn(1, 70).expand(6, 70)  # a weight whose rows overlap: copied when prepared
    assert torch.equal(prepare_linear(shared)(x), linear(x, shared.contiguous()))


def test_prepared_bad_inputs():
    from ringfuse.ops import prepare_linear

    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        prepare_linear([[1.0]])
    with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K\]"):
        prepare_linear(torch.randn(4))
    with pytest.raises(TypeError, match="int8 weights: use ops.int8_weight_only_linear"):
        prepare_linear(torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        prepare_linear(torch.randn(3, 4), torch.randn(4))
    p = prepare_linear(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"x's last dim \(5\) must equal K = 4"):
        p(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        p([1.0, 2.0, 3.0, 4.0])
