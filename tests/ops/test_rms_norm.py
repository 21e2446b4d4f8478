"""ringfuse.ops.rms_norm / add_rms_norm / add_rms_norm_ on CPU vs an fp64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import ringfuse
from ringfuse import _C
from ringfuse.ops import add_rms_norm, add_rms_norm_, rms_norm

from .norm_reference import assert_within_tolerance, rms_ref64, rms_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (3, 577), (7, 64), (2, 3, 77), (5, 4096), (130, 33)]
# (x dtype, weight kind): weight of x's dtype, no weight, or an fp32 weight (mixed precision)
WEIGHT_CASES = [(d, k) for d in DTYPES for k in ("same", "none", "fp32") if (d, k) != (torch.float32, "fp32")]


def make(shape, dtype, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(dtype)


def make_weight(kind, hidden, dtype):
    if kind == "none":
        return None
    w = make((hidden,), torch.float32, seed=7) * 0.5 + 1.0
    return w.to(dtype if kind == "same" else torch.float32)


@pytest.mark.parametrize("dtype,wkind", WEIGHT_CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cast_mode", ["torch", "llama"])
def test_rms_norm_matches_reference(isa, dtype, shape, wkind, cast_mode):
    x = make(shape, dtype)
    w = make_weight(wkind, shape[-1], dtype)
    llama = cast_mode == "llama"
    got = rms_norm(x, w, 1e-6, cast_mode=cast_mode)
    assert_within_tolerance(got, rms_ref64(x, w, 1e-6, llama=llama), rms_torch(x, w, 1e-6, llama=llama), isa,
                            rounding_dtype=dtype if llama else None)


@pytest.mark.parametrize("dtype,wkind", WEIGHT_CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cast_mode", ["torch", "llama"])
def test_add_rms_norm_matches_reference(isa, dtype, shape, wkind, cast_mode):
    x, r = make(shape, dtype, seed=1), make(shape, dtype, seed=2)
    w = make_weight(wkind, shape[-1], dtype)
    llama = cast_mode == "llama"
    out, new_res = add_rms_norm(x, r, w, 1e-5, cast_mode=cast_mode)
    assert torch.equal(new_res, x + r)  # the residual sum is exact in x's dtype
    ref = rms_ref64(x, w, 1e-5, residual=r, llama=llama)
    assert_within_tolerance(out, ref, rms_torch(x, w, 1e-5, residual=r, llama=llama), isa,
                            rounding_dtype=dtype if llama else None)


def test_llama_mode_matches_hf_bitwise():
    """cast_mode='llama' reproduces HF LlamaRMSNorm's rounding exactly (bf16 and fp16)."""
    for dtype in (torch.bfloat16, torch.float16):
        x, w = make((64, 576), dtype, seed=3), make_weight("same", 576, dtype)
        ours = rms_norm(x, w, 1e-5, cast_mode="llama")
        hf = rms_torch(x, w, 1e-5, llama=True)
        # both compute mean(x^2) in fp32, summed in different orders: allow one rounding step
        mismatch = (ours != hf).float().mean().item()
        assert mismatch < 0.01, mismatch
        assert (ours.float() - hf.float()).abs().max() <= 2 * torch.finfo(dtype).eps * hf.float().abs().max()


def test_large_offset_and_scale(isa):
    """Rows with a large common offset and tiny/huge scales stay accurate (fp32 sums)."""
    for scale in (1e-3, 1e3):
        x = make((9, 1000), torch.float32, scale=scale, offset=10 * scale)
        got = rms_norm(x, None, 1e-6)
        assert_within_tolerance(got, rms_ref64(x, None, 1e-6), rms_torch(x, None, 1e-6), f"scale {scale}")


# ---------------------------------------------------------------------------------------
# layouts


def test_strided_rows_read_in_place_without_copy(isa):
    big = make((6, 100), torch.bfloat16)
    x = big[:, 3:80]  # row stride 100, unit inner stride
    w = make_weight("same", 77, torch.bfloat16)
    got = rms_norm(x, w)
    assert got.is_contiguous()
    assert_within_tolerance(got, rms_ref64(x, w, 1e-6), rms_torch(x, w, 1e-6))


def test_non_row_layouts_are_copied(isa):
    base = make((40, 24), torch.float32)
    for x in (base.t(), base[::2], make((4, 5, 6), torch.float32).permute(2, 0, 1), base[:, ::2]):
        got = rms_norm(x, None)
        assert_within_tolerance(got, rms_ref64(x, None, 1e-6), rms_torch(x, None, 1e-6), str(x.stride()))


def test_strided_residual(isa):
    x = make((5, 64), torch.float16)
    r = make((5, 128), torch.float16, seed=5)[:, ::2]
    out, s = add_rms_norm(x, r, None)
    assert torch.equal(s, x + r)
    assert_within_tolerance(out, rms_ref64(x, None, 1e-6, r), rms_torch(x, None, 1e-6, r))


def test_out_argument(isa):
    x = make((33, 577), torch.bfloat16)
    w = make_weight("same", 577, torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    ret = rms_norm(x, w, out=out)
    assert ret is out
    assert torch.equal(out, rms_norm(x, w))
    # an out that is a row-strided view of a larger buffer: bytes outside stay untouched
    buf = torch.full((33, 600), 7.0, dtype=torch.bfloat16)
    rms_norm(x, w, out=buf[:, :577])
    assert torch.equal(buf[:, :577], out) and bool((buf[:, 577:] == 7).all())
    r = make((33, 577), torch.bfloat16, seed=9)
    out2 = torch.empty_like(x)
    o, s = add_rms_norm(x, r, w, out=out2)
    assert o is out2 and torch.equal(s, x + r)


def test_out_may_be_x(isa):
    x = make((4, 50), torch.float32)
    expect = rms_norm(x, None)
    rms_norm(x, None, out=x)
    assert torch.equal(x, expect)


def test_inplace_variant_matches_out_of_place(isa):
    for dtype in DTYPES:
        x, r = make((17, 577), dtype, seed=1), make((17, 577), dtype, seed=2)
        w = make_weight("same", 577, dtype)
        expect_out, expect_res = add_rms_norm(x, r, w, 1e-6)
        xi, ri = x.clone(), r.clone()
        ret = add_rms_norm_(xi, ri, w, 1e-6)
        assert ret[0] is xi and ret[1] is ri
        assert torch.equal(xi, expect_out) and torch.equal(ri, expect_res)


def test_inplace_variant_rejects_copy_layouts():
    x, r = make((8, 8), torch.float32), make((8, 8), torch.float32)
    with pytest.raises(ValueError, match="in place"):
        add_rms_norm_(x.t(), r, None)
    with pytest.raises(ValueError, match="same tensor"):
        add_rms_norm_(x, x, None)
    with pytest.raises(ValueError, match="autograd"):
        add_rms_norm_(x.clone().requires_grad_(), r, None)
    with pytest.raises(TypeError, match="float32 output"):
        add_rms_norm_(x.bfloat16(), r.bfloat16(), torch.ones(8), cast_mode="llama")


# ---------------------------------------------------------------------------------------
# special values and edge cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_like_torch(isa, dtype):
    x = make((4, 37), dtype)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 0] = float("-inf")
    got, expect = rms_norm(x, None), F.rms_norm(x, (37,), None, 1e-6)
    assert torch.equal(got.isnan(), expect.isnan())
    assert torch.equal(got[3], expect[3]) or (got[3].float() - expect[3].float()).abs().max() < 0.02


# fp32 NaNs whose low 16 bits are set: rounded to bf16 by "add 0x7fff + lsb" alone, they would
# turn into +-0 or inf (the AVX2 bf16 stores skip the NaN fix-up for data that cannot hold them)
NAN_PAYLOADS = [0xFFFFFFFF, 0x7FFFFFFF, 0x7F800001, 0xFFC00000, 0x7FC0FFFF]


def nan_with_bits(bits: int) -> torch.Tensor:
    return torch.tensor([bits if bits < 1 << 31 else bits - (1 << 32)], dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("llama", [False, True], ids=["torch_order", "llama_order"])
def test_fp32_weight_nan_payloads_give_nan_in_bf16_output(isa, llama):
    hidden = 80  # five 16-lane blocks: the vector path, not only the tail
    x = make((5, hidden), torch.bfloat16)
    w = torch.rand(hidden) + 0.5
    cols = [1, 18, 40, 63, 79]
    for col, bits in zip(cols, NAN_PAYLOADS):
        w[col] = nan_with_bits(bits)
    got = rms_norm(x, w, cast_mode="llama" if llama else "torch")
    expect = torch.zeros(5, hidden, dtype=torch.bool)
    expect[:, cols] = True
    assert torch.equal(got.isnan(), expect)


def test_residual_sum_nan_and_inf_in_bf16(isa):
    hidden = 48
    x, r = make((3, hidden), torch.bfloat16), make((3, hidden), torch.bfloat16, seed=1)
    x[0, 2], r[0, 2] = float("inf"), float("-inf")  # inf - inf: NaN
    x[1, 20], r[1, 33] = float("nan"), float("inf")
    x[2, 47], r[2, 47] = 3e38, 3e38  # overflows to inf when rounded to bf16
    out, res = add_rms_norm(x, r, torch.ones(hidden, dtype=torch.bfloat16))
    expect = x + r
    assert torch.equal(res.isnan(), expect.isnan()) and torch.equal(res.isinf(), expect.isinf())
    finite = expect.isfinite()
    assert torch.equal(res[finite], expect[finite])
    assert torch.equal(out.isnan(), F.rms_norm(expect.float(), (hidden,), None, 1e-6).isnan())


@pytest.mark.parametrize("shape", [(0, 16), (3, 0), (2, 0, 5)], ids=str)
def test_empty_tensors(isa, shape):
    x = torch.empty(shape)
    w = torch.ones(shape[-1])
    assert rms_norm(x, w).shape == F.rms_norm(x, (shape[-1],), w).shape
    out, res = add_rms_norm(x, x.clone(), w)
    assert out.shape == x.shape and res.shape == x.shape


def test_deterministic_across_runs_and_thread_counts():
    x = make((257, 4096), torch.float32)
    w = make_weight("same", 4096, torch.float32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rms_norm(x, w)
        torch.set_num_threads(2)
        two, again = rms_norm(x, w), rms_norm(x, w)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two) and torch.equal(two, again)


@pytest.mark.parametrize("op", ["rms", "add_rms", "layer", "add_layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,hidden", [(6, 4097), (7, 576), (3, 70)])
def test_a_rows_bits_do_not_depend_on_threads_or_batch(isa, op, dtype, rows, hidden):
    """Rows are normalized in pairs; a lone row summed with another accumulator layout, and
    the thread split (and the batch) decides which rows are paired: [6, 4097] gave other bits
    at 1 and 2 threads, and a row alone other bits than in its batch."""
    from ringfuse.ops import add_layer_norm, layer_norm

    x, r = make((rows, hidden), dtype, seed=3, scale=3.0, offset=0.5), make((rows, hidden), dtype, seed=4)
    w = make_weight("same", hidden, dtype)
    call = {"rms": lambda a, b: rms_norm(a, w), "add_rms": lambda a, b: add_rms_norm(a, b, w)[0],
            "layer": lambda a, b: layer_norm(a, w), "add_layer": lambda a, b: add_layer_norm(a, b, w)[0]}[op]
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(x, r)
        torch.set_num_threads(2)
        two = call(x, r)
        alone = torch.cat([call(x[i : i + 1], r[i : i + 1]) for i in range(rows)])
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two) and torch.equal(two, alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_rows_use_streaming_stores_correctly(dtype):
    """>= 48 MiB of output takes the non-temporal store path: same results as the scalar path."""
    shape = (1600, 4096) if dtype == torch.float32 else (1700, 8192)
    x, r = make(shape, dtype), make(shape, dtype, seed=3)
    w = make_weight("same", shape[1], dtype)
    out, s = add_rms_norm(x, r, w)
    # the same AVX2 code on small chunks (plain stores) must give identical bits
    chunks = [add_rms_norm(x[i : i + 100], r[i : i + 100], w) for i in range(0, shape[0], 100)]
    assert torch.equal(s, torch.cat([c[1] for c in chunks]))
    assert torch.equal(out, torch.cat([c[0] for c in chunks]))
    assert torch.equal(s, x + r)


# ---------------------------------------------------------------------------------------
# bad input: clear errors naming the argument


def test_bad_inputs():
    x = make((4, 8), torch.float32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rms_norm([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(x.double())
    with pytest.raises(ValueError, match="at least 1 dimension"):
        rms_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(2, 4))
    with pytest.raises(TypeError, match="weight must have dtype"):
        rms_norm(x, torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        rms_norm(x, [1.0] * 8)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="cpu or cuda"):
        rms_norm(torch.ones(4, 8, device="meta"))
    for eps in (0.0, -1e-6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            rms_norm(x, None, eps)
    with pytest.raises(TypeError, match="eps must be a float"):
        rms_norm(x, None, "1e-6")
    for eps in (1e-50, 1e300):
        with pytest.raises(ValueError, match="representable in float32"):
            rms_norm(x, None, eps)
    with pytest.raises(ValueError, match="cast_mode"):
        rms_norm(x, None, cast_mode="hf")
    with pytest.raises(ValueError, match="residual must have the shape"):
        add_rms_norm(x, torch.ones(4, 9))
    with pytest.raises(TypeError, match="residual must have the dtype"):
        add_rms_norm(x, torch.ones(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must have shape"):
        rms_norm(x, out=torch.empty(4, 9))
    with pytest.raises(TypeError, match="out must have dtype"):
        rms_norm(x, out=torch.empty(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="overlaps x"):
        big = torch.randn(5, 8)
        rms_norm(big[:4], out=big[1:])
    with pytest.raises(ValueError, match="unit inner stride"):
        rms_norm(x, out=torch.empty(8, 4).t())


def test_c_boundary_rechecks():
    """_C re-checks what would corrupt memory and raises ValueError, never crashes."""
    x = torch.randn(2, 8)
    o = torch.empty_like(x)
    args = dict(out=o.data_ptr(), out_stride=8, residual_out=0, residual_out_stride=0, x=x.data_ptr(),
                x_stride=8, residual=0, residual_stride=0, weight=0, rows=2, hidden=8, eps=1e-6,
                x_dtype=0, w_dtype=0, out_dtype=0, llama_cast=False, num_threads=1)
    _C.rms_norm(**args)
    for bad, msg in [
        (dict(x=0), "null"),
        (dict(hidden=0), "hidden must be >= 1"),
        (dict(rows=-1), "rows must be >= 0"),
        (dict(eps=0.0), "eps"),
        (dict(x_dtype=4), "x dtype"),
        (dict(w_dtype=1), "weight dtype"),
        (dict(x_stride=4), "row strides"),
        (dict(residual=x.data_ptr()), "together"),
    ]:
        with pytest.raises(ValueError, match=msg):
            _C.rms_norm(**{**args, **bad})
    with pytest.raises(ValueError, match="isa"):
        _C.set_isa("avx512")


# ---------------------------------------------------------------------------------------
# autograd and torch.compile


@pytest.mark.parametrize("cast_mode", ["torch", "llama"])
def test_autograd_matches_torch(cast_mode):
    x = make((6, 77), torch.float32).requires_grad_()
    r = make((6, 77), torch.float32, seed=4).requires_grad_()
    w = make_weight("same", 77, torch.float32).requires_grad_()
    g, gr = make((6, 77), torch.float32, seed=5), make((6, 77), torch.float32, seed=6)

    out, s = add_rms_norm(x, r, w, 1e-6, cast_mode=cast_mode)
    (out * g + s * gr).sum().backward()
    ours = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    s_ref = x + r
    ((F.rms_norm(s_ref, (77,), w, 1e-6) * g) + s_ref * gr).sum().backward()
    for a, b in zip(ours, (x.grad, r.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    x.grad = w.grad = None
    (rms_norm(x, w, cast_mode=cast_mode) * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (F.rms_norm(x, (77,), w, 1e-6) * g).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)


def test_autograd_bf16_and_no_weight():
    x = make((4, 64), torch.bfloat16).requires_grad_()
    rms_norm(x, None).float().sum().backward()
    x64 = x.detach().double().requires_grad_()
    (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2)


def test_torch_compile_fullgraph():
    def block(x, r, w):
        h, s = add_rms_norm(x, r, w, 1e-5)
        return rms_norm(h * 2, w, 1e-5) + s

    x, r = make((3, 5, 64), torch.float32), make((3, 5, 64), torch.float32, seed=1)
    w = make_weight("same", 64, torch.float32)
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, r, w), block(x, r, w), rtol=1e-6, atol=1e-6)


def test_ops_are_registered():
    for name in ("rms_norm", "add_rms_norm", "add_rms_norm_", "layer_norm", "add_layer_norm"):
        assert hasattr(torch.ops.ringfuse, name)
    x = make((2, 16), torch.float32)
    torch.testing.assert_close(torch.ops.ringfuse.rms_norm(x, None, 1e-6, False), rms_norm(x))
    assert ringfuse.ops.rms_norm is rms_norm
    assert not math.isnan(float(rms_norm(x).sum()))


def test_residual_out_argument(isa):
    x, r = make((9, 40), torch.bfloat16, seed=1), make((9, 40), torch.bfloat16, seed=2)
    expect_out, expect_res = add_rms_norm(x, r, None)
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    o, s = add_rms_norm(x, r, None, out=out, residual_out=res_out)
    assert o is out and s is res_out
    assert torch.equal(out, expect_out) and torch.equal(res_out, expect_res)
    # residual_out may be the residual itself: the residual stream updated in place
    r2 = r.clone()
    o, s = add_rms_norm(x, r2, None, residual_out=r2)
    assert s is r2 and torch.equal(r2, expect_res) and torch.equal(o, expect_out)
    with pytest.raises(ValueError, match="residual_out and out must not share memory"):
        add_rms_norm(x, r, None, out=out, residual_out=out)
    with pytest.raises(TypeError, match="residual_out must have dtype"):
        add_rms_norm(x, r, None, residual_out=torch.empty(9, 40))
    with pytest.raises(ValueError, match="residual_out overlaps residual"):
        big = torch.zeros(10, 40, dtype=torch.bfloat16)
        add_rms_norm(x, big[:9], None, residual_out=big[1:])


def test_other_weight_dtypes_are_upcast(isa):
    """A weight in another float dtype (fp32 x with a bf16 weight, bf16 x with fp16) computes
    with the weight in fp32, as torch's math does."""
    for xd, wd in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)):
        x, w = make((5, 40), xd), make_weight("same", 40, wd)
        got = rms_norm(x, w)
        assert got.dtype == xd
        ref = rms_ref64(x, w, 1e-6)
        assert_within_tolerance(got, ref, F.rms_norm(x, (40,), w.to(xd), 1e-6), f"{xd} {wd}")
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(rms_norm(x, None, np.float32(1e-6)), rms_norm(x, None, 1e-6))


def test_broadcast_and_overlapping_rows_are_copied(isa):
    """expand / as_strided inputs whose rows overlap are valid inputs (copied first)."""
    row = make((8,), torch.float32)
    for x in (row.expand(4, 8), make((64,), torch.float32).as_strided((4, 8), (4, 1))):
        assert_within_tolerance(rms_norm(x, None), rms_ref64(x, None, 1e-6), rms_torch(x, None, 1e-6))
        out, s = add_rms_norm(make((4, 8), torch.float32), x, None)
        assert torch.equal(s, make((4, 8), torch.float32) + x)
    with pytest.raises(ValueError, match="out must have a unit inner stride and one row stride"):
        rms_norm(make((4, 8), torch.float32), out=torch.empty(8).expand(4, 8))


def test_parameters_aliasing_outputs_are_rejected():
    x, r = make((4, 8), torch.float32), make((4, 8), torch.float32, seed=1)
    with pytest.raises(ValueError, match="out overlaps weight"):
        rms_norm(x, x[0], out=x)
    with pytest.raises(ValueError, match="weight must not share memory"):
        add_rms_norm_(x, r, r[3])
    with pytest.raises(ValueError, match="residual_out overlaps weight"):
        add_rms_norm(x, r, r[0], residual_out=r)
    # same address and strides but another dtype is not "in place": it is an overlap
    store = torch.randn(32)
    xbf = store.view(torch.bfloat16)[:32].view(4, 8)
    with pytest.raises(ValueError, match="out overlaps x"):
        rms_norm(xbf, torch.ones(8), cast_mode="llama", out=store.view(4, 8))


def test_out_with_autograd_inputs_is_rejected():
    x = make((3, 8), torch.float32).requires_grad_()
    with pytest.raises(ValueError, match="does not support autograd"):
        rms_norm(x, None, out=torch.empty(3, 8))
    with pytest.raises(ValueError, match="does not support autograd"):
        add_rms_norm(x.detach(), x.detach(), torch.ones(8, requires_grad=True), residual_out=torch.empty(3, 8))


def test_opcheck():
    """torch.library.opcheck: schema, fake kernels (shapes and strides), autograd registration."""
    xt, rt = make((16, 4), torch.float32).t(), make((16, 4), torch.float32, seed=1).t()
    w = make_weight("same", 16, torch.float32)
    torch.library.opcheck(torch.ops.ringfuse.rms_norm.default, (xt, w, 1e-6, False))
    torch.library.opcheck(torch.ops.ringfuse.add_rms_norm.default, (xt, rt, None, 1e-6, False))
    torch.library.opcheck(torch.ops.ringfuse.add_rms_norm.default, (xt.bfloat16(), rt.bfloat16(), w, 1e-6, True))
    torch.library.opcheck(torch.ops.ringfuse.add_rms_norm_.default,
                          (make((4, 16), torch.float32), make((4, 16), torch.float32, seed=2), w, 1e-6, False))


# ---- prepare_rms_norm ----------------------------------------------------------------------


@pytest.mark.parametrize("cast_mode", ["torch", "llama"])
@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])  # fmt: skip
def test_prepared_add_rms_norm_equals_op(cast_mode, xdt, wdt):
    """prepare_rms_norm(w).add_ gives add_rms_norm_'s bits (and errors) on the direct path
    and on every fallback."""
    import ringfuse.ops as rops

    g = torch.Generator().manual_seed(3)
    w = (torch.rand(40, generator=g) + 0.5).to(wdt)
    norm = rops.prepare_rms_norm(w, 1e-5, cast_mode=cast_mode)
    base_x, base_r = torch.randn(4, 40, generator=g).to(xdt), torch.randn(4, 40, generator=g).to(xdt)
    layouts = [lambda t: t, lambda t: t[:1], lambda t: t[:0], lambda t: t.view(2, 2, 40),
               lambda t: torch.empty(4, 80, dtype=t.dtype)[:, :40].copy_(t)]  # fmt: skip
    for layout in layouts:
        a = (layout(base_x.clone()), layout(base_r.clone()))
        b = (layout(base_x.clone()), layout(base_r.clone()))
        try:
            rops.add_rms_norm_(*a, w, 1e-5, cast_mode=cast_mode)
        except TypeError as e:  # llama mode with a weight that widens x's dtype
            with pytest.raises(TypeError, match=str(e)[:40]):
                norm.add_(*b)
            continue
        got = norm.add_(*b)
        assert got[0] is b[0] and got[1] is b[1]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_prepared_rms_norm_bad_inputs():
    import ringfuse.ops as rops

    with pytest.raises(ValueError, match=r"weight must be a 1-D tensor \[hidden\]"):
        rops.prepare_rms_norm(torch.ones(2, 3))
    with pytest.raises(ValueError, match="cast_mode must be one of"):
        rops.prepare_rms_norm(torch.ones(3), cast_mode="hf")
    with pytest.raises(ValueError, match="eps"):
        rops.prepare_rms_norm(torch.ones(3), -1.0)
    norm = rops.prepare_rms_norm(torch.ones(8))
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x and residual must not share memory"):
        norm.add_(x, x)
    with pytest.raises(ValueError, match=r"residual must have the shape of x"):
        norm.add_(x, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"weight must have shape \(9,\) to match x's last dim, got \(8,\)"):
        norm.add_(torch.randn(2, 9), torch.randn(2, 9))
    w = torch.ones(8)
    with pytest.raises(ValueError, match="weight must not share memory with x or residual"):
        rops.prepare_rms_norm(w).add_(w.view(1, 8), torch.randn(1, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_arguments_give_the_fresh_results_and_mark_their_writes(isa, dtype):
    """Every accepted combination of out= / residual_out= (new buffers, one of them only, in
    place on x or the residual, swapped) writes what the fresh call returns, returns the given
    tensors and bumps their versions: the checked CPU fast path (plain_outputs) and the
    full path alike (a non-contiguous weight forces the full one)."""
    from ringfuse.ops import add_layer_norm, layer_norm

    x0, r0 = make((6, 40), dtype, seed=1), make((6, 40), dtype, seed=2)
    w = make_weight("same", 40, dtype)
    b = make((40,), dtype, seed=3)
    fused = {"add_rms_norm": add_rms_norm, "add_layer_norm": lambda x, r, w, **kw: add_layer_norm(x, r, w, b, **kw)}
    for name, op in fused.items():
        expect_out, expect_res = op(x0, r0, w)
        for weight in (w, torch.stack([w, w], 1)[:, 0]):  # contiguous: fast path; strided: full path
            for case in ("new", "out only", "residual_out only", "in place", "swapped"):
                x, r = x0.clone(), r0.clone()
                out = {"new": torch.empty_like(x), "out only": torch.empty_like(x), "in place": x, "swapped": r}.get(case)
                res_out = {"new": torch.empty_like(x), "residual_out only": torch.empty_like(x), "in place": r,
                           "swapped": x}.get(case)  # fmt: skip
                given = [t for t in (out, res_out) if t is not None]
                versions = [t._version for t in given]
                got_out, got_res = op(x, r, weight, out=out, residual_out=res_out)
                assert out is None or got_out is out, (name, case)
                assert res_out is None or got_res is res_out, (name, case)
                assert torch.equal(got_out, expect_out) and torch.equal(got_res, expect_res), (name, case)
                for t, v in zip(given, versions):
                    assert t._version > v, (name, case)
    for op, args in ((rms_norm, (w,)), (layer_norm, (w, b))):
        expect = op(x0, *args)
        for case in ("new", "in place"):
            x = x0.clone()
            out = torch.empty_like(x) if case == "new" else x
            v0 = out._version
            assert op(x, *args, out=out) is out and torch.equal(out, expect) and out._version > v0, (op, case)
