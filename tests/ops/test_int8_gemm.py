"""ringfuse.ops.quantize_per_token and int8_gemm on CPU (AVX2 and scalar): quantization
bitwise vs torch's formula, the int32 product bitwise vs an int64 matmul."""

import pytest
import torch

from ringfuse import _C
from ringfuse.ops import (
    DeviceValueError,
    check_device_errors,
    int8_gemm,
    int8_weight_only_linear,
    pack_int8_weight,
    prepare_int8_weight_only_linear,
    quantize_per_token,
)

from .isa import at_avx2_and_avx512

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(x):
    """fp32 torch math: scale = amax / 127, q = round_half_even(x / scale) (0 for a zero row)."""
    xf = x.float()
    scale = xf.abs().amax(-1)
    scale = scale / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe[..., None]).clamp(-127, 127)
    q = torch.where(scale[..., None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 577), (17, 64), (2, 3, 129), (5, 4096), (1, 33)], ids=str)
def test_matches_torch_bitwise(isa, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    x.view(-1, shape[-1])[0, 0] = 50.0  # a outlier channel
    q, scale = quantize_per_token(x)
    ref_q, ref_scale = reference(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == x.shape[:-1]
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q, ref_q)
    # dequantized within half a step of x
    assert bool(((q.float() * scale[..., None] - x.float()).abs() <= scale[..., None] * 0.5 * (1 + 1e-5)).all())


def test_ties_round_half_to_even_and_extremes(isa):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0, 126.5], [0.0] * 8])
    q, scale = quantize_per_token(x)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -127, 126]
    assert scale.tolist() == [1.0, 0.0] and q[1].tolist() == [0] * 8  # zero row: scale 0, q 0


def test_strided_input_and_threads():
    big = torch.randn(64, 300)
    x = big[:, 10:260]  # row stride 300
    q, scale = quantize_per_token(x)
    ref_q, ref_scale = reference(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    xt = torch.randn(40, 64).t()  # last dim strided: copied once
    assert torch.equal(quantize_per_token(xt)[0], reference(xt)[0])
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize_per_token(big)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one[0], quantize_per_token(big)[0])


def test_empty_rows():
    q, scale = quantize_per_token(torch.empty(0, 16))
    assert q.shape == (0, 16) and scale.shape == (0,)


def test_torch_compile_fullgraph():
    x = torch.randn(6, 40)
    f = torch.compile(lambda t: quantize_per_token(t), fullgraph=True, backend="aot_eager")
    q, scale = f(x)
    ref_q, ref_scale = reference(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    torch.library.opcheck(torch.ops.ringfuse.quantize_per_token, (x,))


def test_bad_inputs(isa):
    for bad in (float("inf"), float("-inf"), float("nan")):
        x = torch.randn(4, 20)
        x[2, 5] = bad
        with pytest.raises(ValueError, match=r"x holds inf or NaN in 1 row\(s\)"):
            quantize_per_token(x)
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize_per_token(torch.randint(0, 5, (3, 4)))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quantize_per_token([1.0, 2.0])
    with pytest.raises(ValueError, match="at least one dimension of size >= 1"):
        quantize_per_token(torch.empty(3, 0))
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize_per_token(torch.tensor(1.0))
    with pytest.raises(ValueError, match="row strides must be >= k"):  # C++ boundary
        _C.quantize_per_token(1, 2, 1, 1, 8, 3, 8, 0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(dtype):
    x = (torch.randn(33, 1000) * 3).to(dtype)
    q, scale = quantize_per_token(x.cuda())
    ref_q, ref_scale = quantize_per_token(x)
    assert torch.equal(q.cpu(), ref_q) and torch.equal(scale.cpu(), ref_scale)
    x[3, 3] = float("nan")
    check_device_errors()
    q, scale = quantize_per_token(x.cuda())  # no sync: the row's scale is NaN and the flag says why
    assert torch.isnan(scale[3]).item() and not torch.isnan(scale[torch.arange(33) != 3]).any().item()
    assert (q[3] == 0).all().item()
    with pytest.raises(DeviceValueError, match="inf or NaN"):
        check_device_errors()


# ---------------------------------------------------------------------------------------
# int8_gemm

SIZES = [1, 3, 17, 129, 577]


def rand_int8(shape, seed, low=-128):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(low, 128, shape, generator=g, dtype=torch.int8)
    t.view(-1)[: min(4, t.numel())] = torch.tensor([-128 if low == -128 else -127, 127, -127, 0], dtype=torch.int8)[
        : min(4, t.numel())]  # the extremes are always there
    return t


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("n", SIZES)
def test_int32_product_is_exact(avx512_isa, m, k, n):
    """Weights in [-127, 127] (what symmetric quantization gives) take the AVX2 kernel; a
    holds -128 too. Weights with -128 take the exact fallback there (the VNNI kernel takes
    any int8)."""
    a = rand_int8((m, k), m * 1000 + k)
    for b in (rand_int8((n, k), n * 7 + k, low=-127), rand_int8((n, k), n * 7 + k + 1)):
        got = int8_gemm(a, b, out_dtype=torch.int32)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got, (a.long() @ b.long().T).int())


def test_saturation_corner_and_scalar_isa(avx512_isa):
    """All -128 in a against all +-127 in b: the largest int16 pair sums of the sign trick."""
    a = torch.full((5, 64), -128, dtype=torch.int8)
    b = torch.full((19, 64), 127, dtype=torch.int8)
    b[::2] = -127
    assert torch.equal(int8_gemm(a, b, out_dtype=torch.int32), (a.long() @ b.long().T).int())
    a2, b2 = rand_int8((33, 70), 1), rand_int8((40, 70), 2)
    assert torch.equal(int8_gemm(a2, b2, out_dtype=torch.int32), (a2.long() @ b2.long().T).int())


def test_long_k_wraps_back_to_the_exact_product(avx512_isa):
    """K = 131000 with a = -128, b = +-127: a . b still fits int32, but the VNNI kernel's
    offset sum (b + 128) a = 255 * -128 * K does not; it wraps mod 2^32 and the subtracted
    128 * rowsum(a) wraps it back."""
    k = 131000
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), 127, dtype=torch.int8)
    b[1] = -127
    b[2, ::2] = -128
    assert torch.equal(int8_gemm(a, b, out_dtype=torch.int32), (a.long() @ b.long().T).int())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_epilogue(avx512_isa, out_dtype, with_bias):
    a, b = rand_int8((17, 129), 3), rand_int8((33, 129), 4, low=-127)
    a_scale, b_scale = torch.rand(17) * 0.1, torch.rand(33) * 0.01
    bias = torch.randn(33).to(out_dtype) if with_bias else None
    got = int8_gemm(a, b, a_scale, b_scale, bias, out_dtype=out_dtype)
    prod = (a.double() @ b.double().T) * a_scale.double()[:, None] * b_scale.double()[None, :]
    ref = prod + bias.double() if with_bias else prod
    assert got.dtype == out_dtype
    # fp32 epilogue (two products and an add: errors relative to the terms, not their sum)
    # then one rounding to out_dtype
    terms = prod.abs() + (bias.double().abs() if with_bias else 0)
    tol = 4 * torch.finfo(torch.float32).eps * terms + torch.finfo(out_dtype).eps * ref.abs()
    assert bool(((got.double() - ref).abs() <= tol + 1e-12).all())


def test_w8a8_approximates_float_matmul():
    x, w = torch.randn(64, 256), torch.randn(96, 256)
    (xq, xs), (wq, ws) = quantize_per_token(x), quantize_per_token(w)
    y = int8_gemm(xq, wq, xs, ws)
    ref = x @ w.T
    assert ((y - ref).norm() / ref.norm()).item() < 0.02  # two 8-bit roundings of Gaussian data


def test_int8_gemm_compile_and_opcheck():
    a, b = rand_int8((6, 40), 5), rand_int8((7, 40), 6, low=-127)
    s_a, s_b = torch.rand(6), torch.rand(7)
    f = torch.compile(lambda x, y: int8_gemm(x, y, s_a, s_b), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(a, b), int8_gemm(a, b, s_a, s_b))
    torch.library.opcheck(torch.ops.ringfuse.int8_gemm, (a, b, s_a, s_b, None, torch.float32))
    torch.library.opcheck(torch.ops.ringfuse.int8_gemm, (a, b, None, None, None, torch.int32))


def test_int8_gemm_bad_inputs():
    a, b = rand_int8((4, 16), 7), rand_int8((5, 16), 8)
    s_a, s_b = torch.rand(4), torch.rand(5)
    with pytest.raises(TypeError, match="a_q must have dtype int8"):
        int8_gemm(a.float(), b, s_a, s_b)
    with pytest.raises(ValueError, match=r"K of a_q \(16\) and b_q \(8\) differ"):
        int8_gemm(a, b[:, :8], s_a, s_b)
    with pytest.raises(ValueError, match=r"a_scale must have shape \(4,\)"):
        int8_gemm(a, b, s_a[:3], s_b)
    with pytest.raises(TypeError, match="b_scale must have dtype torch.float32"):
        int8_gemm(a, b, s_a, s_b.half())
    with pytest.raises(ValueError, match="a_scale \\[M\\] and b_scale \\[N\\] are required"):
        int8_gemm(a, b)
    with pytest.raises(ValueError, match="pass no scales and no bias"):
        int8_gemm(a, b, s_a, s_b, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="unit stride along K"):
        int8_gemm(a.t().contiguous().t(), b, s_a, s_b)
    with pytest.raises(ValueError, match="must be 2-D"):
        int8_gemm(a[None], b, s_a, s_b)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        int8_gemm(a, b, s_a, s_b, out_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        int8_gemm(a, b, s_a, s_b, torch.zeros(4))
    with pytest.raises(ValueError, match="bad pointers or strides"):  # C++ boundary
        _C.int8_gemm_packed(0, 1, 4, 0, 1, 0, 0, 1, False, 0, 0, 0, 2, 2, 4, 1)


def test_prepacked_weight_gives_the_same_bits():
    a, b = rand_int8((9, 100), 11), rand_int8((50, 100), 12, low=-127)
    s_a, s_b = torch.rand(9), torch.rand(50)
    packed = pack_int8_weight(b)
    assert not packed.has_min and pack_int8_weight(rand_int8((3, 8), 13)).has_min
    assert torch.equal(int8_gemm(a, b, s_a, s_b, packed=packed), int8_gemm(a, b, s_a, s_b))
    with pytest.raises(ValueError, match="packed must be pack_int8_weight"):
        int8_gemm(a, b.clone(), s_a, s_b, packed=packed)


# ---------------------------------------------------------------------------------------
# int8_weight_only_linear


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 4, 8, 9, 16, 17])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 5), (64, 33), (577, 129)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_only_matches_reference(avx512_isa, dtype, m, k, n, with_bias):
    """vs the fp64 product with the dequantized weight, under the tolerance rule (torch's
    own F.linear in x's dtype with the dequantized weight is the error budget)."""
    g = torch.Generator().manual_seed(m * 100 + k + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w_q = rand_int8((n, k), k + n, low=-127)
    w_scale = torch.rand(n, generator=g) * 0.02
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    w = w_q.double() * w_scale.double()[:, None]
    ref = x.double() @ w.T + (bias.double() if with_bias else 0)
    got = int8_weight_only_linear(x, w_q, w_scale, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    same = torch.nn.functional.linear(x, w.to(dtype), bias)
    err, err_torch = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * max(1.0, (x.double().abs() @ w.abs().T).max().item())
    assert err <= 2 * err_torch + floor


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("m", [1, 4])
def test_weight_only_long_k_within_tolerance(avx512_isa, m, group_size):
    """K = 4096: the scalar path summed all of K in one fp32 chain, 4-8x torch's error."""
    k, n = 4096, 48
    g = torch.Generator().manual_seed(m + 7)
    x = torch.randn(m, k, generator=g)
    w_q = rand_int8((n, k), 11, low=-127)
    groups = 1 if group_size is None else k // group_size
    w_scale = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    scale = w_scale.double() if group_size is not None else w_scale.double()[:, :1]
    w = (w_q.double().view(n, groups, -1) * scale[:, :, None]).view(n, k)
    ref = x.double() @ w.T
    got = int8_weight_only_linear(x, w_q, w_scale if group_size else w_scale[:, 0], group_size=group_size)
    same = torch.nn.functional.linear(x, w.float())
    err, err_torch = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item()), (err, err_torch)


@pytest.mark.skipif(not _C.build_info()["cpu_has_avx512_vnni"], reason="needs AVX-512")
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("m,k,n", [(1, 70, 13), (2, 129, 9), (3, 64, 17), (5, 300, 8), (8, 1100, 23), (9, 37, 5),
                                   (13, 64, 33), (16, 40, 9), (17, 64, 20), (25, 130, 47), (40, 576, 96)], ids=str)  # fmt: skip
def test_weight_only_avx512_gemm_gives_the_avx2_bits(m, k, n, group_size):
    """Every AVX-512 path of the op sums each output in its AVX2 path's order: the same bits
    on every shape, partial blocks and panels included (M <= 16 per channel: two weight rows
    per zmm register; larger M: 12 x 32 GEMM blocks)."""
    g = torch.Generator().manual_seed(m + k + n)
    x, w_q = torch.randn(m, k, generator=g), rand_int8((n, k), k + n, low=-127)
    w_scale = torch.rand(n, -(-k // group_size) if group_size else 1, generator=g).squeeze(1) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g)
    narrow, wide = at_avx2_and_avx512(
        lambda: [int8_weight_only_linear(x.to(dt), w_q, w_scale, bias.to(dt), group_size=group_size) for dt in DTYPES]
    )
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k", [7, 300, 1100])
def test_weight_only_row_equals_alone(k):
    """Per-channel weights at M <= 16: row r of an M-row call has the bits of the 1-row call
    (a batch does not change a sequence's logits)."""
    g = torch.Generator().manual_seed(k)
    x, w_q, w_scale = torch.randn(16, k, generator=g), rand_int8((37, k), k, low=-127), torch.rand(37, generator=g)
    for m in (2, 4, 8, 11, 16):
        full = int8_weight_only_linear(x[:m], w_q, w_scale)
        for r in range(m):
            assert torch.equal(full[r], int8_weight_only_linear(x[r : r + 1], w_q, w_scale)[0]), (m, r)


def test_quantize_per_token_reads_broadcast_rows():
    """An expanded x (rows 0 elements apart) is quantized like its contiguous copy (it was
    refused by the C++ stride check)."""
    x = torch.randn(1, 70).expand(3, 70)
    for got, want in zip(quantize_per_token(x), quantize_per_token(x.contiguous())):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("low", [-128, -127])  # -128 takes the GEMM's exact fallback
def test_prepared_w8a8_linear_equals_the_two_ops(bias_dtype, low):
    """prepare_int8_linear gives w8a8_linear's bits (quantize_per_token, then int8_gemm) on
    its direct path and on every fallback, and is the plain composition of the two ops."""
    from ringfuse.ops import prepare_int8_linear, w8a8_linear

    g = torch.Generator().manual_seed(7)
    w_q, w_scale = rand_int8((37, 70), 8, low=low), torch.rand(37, generator=g) * 0.02
    bias = None if bias_dtype is None else torch.randn(37, generator=g).to(bias_dtype)
    p = prepare_int8_linear(w_q, w_scale, bias)
    x = torch.randn(6, 70, generator=g)
    cases = (x, x[:1], x[:0], x.bfloat16(), x.half(), x.reshape(2, 3, 70), x.T.contiguous().T,
             torch.randn(1, 70).expand(3, 70), x[:, None, :])  # fmt: skip
    for xi in cases:
        want = w8a8_linear(xi, w_q, w_scale, bias)
        assert torch.equal(p(xi), want), (xi.shape, xi.dtype, xi.stride())
        x_q, x_s = quantize_per_token(xi.reshape(-1, 70))
        two_ops = int8_gemm(x_q, w_q, x_s, w_scale, bias, out_dtype=xi.dtype).reshape(*xi.shape[:-1], 37)
        assert torch.equal(want, two_ops) and want.dtype == xi.dtype
    with pytest.raises(ValueError, match="quantize_per_token: x must have at least one dimension"):
        p(torch.tensor(1.0))
    with pytest.raises(ValueError, match="K of a_q"):
        p(torch.randn(2, 69))
    with pytest.raises(TypeError, match="x must have dtype"):
        p(torch.randn(2, 70).double())
    with pytest.raises(TypeError, match="w_q must"):
        prepare_int8_linear(w_q.float(), w_scale)
    with pytest.raises(ValueError, match="w_scale"):
        prepare_int8_linear(w_q, w_scale[:4])
    with pytest.raises(ValueError, match="K must be <="):
        prepare_int8_linear(torch.zeros(2, 140000, dtype=torch.int8), torch.ones(2))


def test_prepared_w8a8_linear_follows_changed_weights():
    """Weights swapped (w.data = ...), written in place or a scale changed: the next call
    checks and packs again, never computing with the old weights."""
    from ringfuse.ops import prepare_int8_linear, w8a8_linear

    g = torch.Generator().manual_seed(8)
    w_q, w_scale, bias = rand_int8((16, 64), 9, low=-127), torch.rand(16, generator=g), torch.randn(16, generator=g)
    p, x = prepare_int8_linear(w_q, w_scale, bias), torch.randn(3, 64, generator=g)
    p(x)
    w_q.data = rand_int8((16, 64), 10, low=-127)
    assert torch.equal(p(x), w8a8_linear(x, w_q, w_scale, bias))
    w_q[0].fill_(-128)
    assert torch.equal(p(x), w8a8_linear(x, w_q, w_scale, bias))
    w_scale.mul_(2)
    bias.add_(1)
    assert torch.equal(p(x), w8a8_linear(x, w_q, w_scale, bias))


@pytest.mark.parametrize("with_bias", [False, True])
def test_prepared_weight_only_equals_op(with_bias):
    """prepare_int8_weight_only_linear gives the op's bits on its direct path and on every
    fallback; bad weights fail when prepared, bad x when called."""
    from ringfuse.ops import prepare_int8_weight_only_linear

    g = torch.Generator().manual_seed(5)
    w_q, w_scale = rand_int8((21, 66), 6, low=-127), torch.rand(21, generator=g)
    bias = torch.randn(21, generator=g).bfloat16() if with_bias else None
    p = prepare_int8_weight_only_linear(w_q, w_scale, bias)
    x = torch.randn(6, 66, generator=g)
    for xi in (x, x[:1], x[:0], x.bfloat16(), x[:, None, :], x.T.contiguous().T, torch.randn(1, 66).expand(3, 66)):
        assert torch.equal(p(xi), int8_weight_only_linear(xi, w_q, w_scale, bias)), (xi.shape, xi.dtype)
    rows = torch.randn(1, 66).expand(3, 66)  # row stride 0 (was refused by the C++ check)
    assert torch.equal(int8_weight_only_linear(rows, w_q, w_scale, bias),
                       int8_weight_only_linear(rows.contiguous(), w_q, w_scale, bias))  # fmt: skip
    with pytest.raises(ValueError, match=r"x must be \[..., K\] with K = 66"):
        p(torch.randn(2, 65))
    with pytest.raises(TypeError, match="w_q must"):
        prepare_int8_weight_only_linear(w_q.float(), w_scale)
    with pytest.raises(ValueError, match="w_scale"):
        prepare_int8_weight_only_linear(w_q, w_scale[:4])


def test_weight_only_batched_input_and_compile():
    x = torch.randn(2, 3, 40)
    w_q, w_scale = quantize_per_token(torch.randn(24, 40))
    y = int8_weight_only_linear(x, w_q, w_scale)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ (w_q.float() * w_scale[:, None]).T, atol=1e-5, rtol=1e-5)
    f = torch.compile(lambda t: int8_weight_only_linear(t, w_q, w_scale), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), y)
    torch.library.opcheck(torch.ops.ringfuse.int8_weight_only_linear, (x, w_q, w_scale, None))


def test_weight_only_bad_inputs():
    x, w_q, w_scale = torch.randn(3, 16), rand_int8((5, 16), 1, low=-127), torch.rand(5)
    with pytest.raises(ValueError, match=r"x must be \[..., K\] with K = 16"):
        int8_weight_only_linear(x[:, :8], w_q, w_scale)
    with pytest.raises(TypeError, match="w_q must have dtype int8"):
        int8_weight_only_linear(x, w_q.float(), w_scale)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(5,\)"):
        int8_weight_only_linear(x, w_q, w_scale[:4])
    with pytest.raises(TypeError, match="x must have dtype"):
        int8_weight_only_linear(x.double(), w_q, w_scale)
    with pytest.raises(ValueError, match="bad pointers or strides"):  # C++ boundary
        _C.int8_weight_only_linear(0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 2, 2, 4, 1)
    with pytest.raises(ValueError, match="group_size must be 0"):  # C++ boundary
        _C.int8_weight_only_linear(0, 1, 0, 0, 1, 0, 1, 0, 1, 24, 0, 2, 2, 4, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 4, 5, 13])
@pytest.mark.parametrize("k,group_size", [(16, 16), (77, 32), (200, 64), (300, 128), (128, 128)], ids=str)
def test_weight_only_per_group_scales(avx512_isa, dtype, m, k, group_size):
    """w_scale [N, ceil(K / group_size)]: each group of K-columns has its own scale (the
    last group may be partial); same tolerance rule as the per-channel test."""
    n = 11
    g = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=g).to(dtype)
    w_q = rand_int8((n, k), k, low=-127)
    groups = -(-k // group_size)
    w_scale = torch.rand(n, groups, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g)
    w = w_q.double() * w_scale.double().repeat_interleave(group_size, dim=1)[:, :k]
    ref = x.double() @ w.T + bias.double()
    got = int8_weight_only_linear(x, w_q, w_scale, bias, group_size=group_size)
    same = torch.nn.functional.linear(x, w.to(dtype), bias.to(dtype))
    err, err_torch = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * max(1.0, (x.double().abs() @ w.abs().T).max().item())
    assert err <= 2 * err_torch + floor
    if groups > 1:  # the group scales matter: one scale per row would be far off
        flat = int8_weight_only_linear(x, w_q, w_scale[:, 0].contiguous(), bias)
        assert (flat.double() - ref).abs().max().item() > 10 * (err + floor)


def test_weight_only_per_group_bad_inputs():
    x, w_q = torch.randn(3, 40), rand_int8((5, 40), 1, low=-127)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(N, ceil\(K / group_size\)\) = \(5, 2\)"):
        int8_weight_only_linear(x, w_q, torch.rand(5, 3), group_size=32)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(5,\)"):
        int8_weight_only_linear(x, w_q, torch.rand(5, 2))  # group scales without group_size
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 16"):
        int8_weight_only_linear(x, w_q, torch.rand(5, 2), group_size=24)
    with pytest.raises(TypeError, match="group_size must be an int or None"):
        int8_weight_only_linear(x, w_q, torch.rand(5, 2), group_size=32.0)
    with pytest.raises(TypeError, match="w_scale must have dtype torch.float32"):
        int8_weight_only_linear(x, w_q, torch.rand(5, 2).half(), group_size=32)
    f = torch.compile(lambda t: int8_weight_only_linear(t, w_q, torch.ones(5, 2), group_size=32), fullgraph=True,
                      backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(f(x), int8_weight_only_linear(x, w_q, torch.ones(5, 2), group_size=32))
    torch.library.opcheck(torch.ops.ringfuse.int8_weight_only_linear, (x, w_q, torch.ones(5, 2), None, 32))


def test_weight_only_names_the_tensor_on_another_device():
    x, w_q = torch.randn(3, 16), rand_int8((5, 16), 1, low=-127)
    with pytest.raises(ValueError, match="w_scale is on meta but w_q is on cpu"):
        int8_weight_only_linear(x, w_q, torch.rand(5, device="meta"))


def test_int8_peak_probe_does_the_work_it_counts(avx512_isa):
    """bench limits' int8 dot peak: every counted multiply-add of 1 x 1 lands in the sum."""
    from ringfuse import _C

    assert _C.probe_int8_dot(1000, 2) == _C.probe_int8_ops_per_iter(2) * 1000 // 2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 17, 300])
def test_cuda_int8_gemm_matches_cpu(m):
    """CUDA (Triton) vs the CPU kernels: the int32 product bitwise, the scaled output within
    one rounding of the output dtype."""
    a, b = rand_int8((m, 577), m), rand_int8((129, 577), m + 1)
    assert torch.equal(int8_gemm(a.cuda(), b.cuda(), out_dtype=torch.int32).cpu(), int8_gemm(a, b, out_dtype=torch.int32))
    s_a, s_b, bias = torch.rand(m) * 0.01, torch.rand(129) * 0.01, torch.randn(129)
    for dt in (torch.float32, torch.bfloat16):
        got = int8_gemm(a.cuda(), b.cuda(), s_a.cuda(), s_b.cuda(), bias.cuda(), out_dtype=dt).cpu()
        torch.testing.assert_close(got, int8_gemm(a, b, s_a, s_b, bias, out_dtype=dt), atol=1e-5, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [None, 32])
def test_cuda_weight_only_matches_cpu(dtype, group_size):
    x, w_q = torch.randn(5, 200).to(dtype), rand_int8((70, 200), 3, low=-127)
    w_scale = torch.rand(70) * 0.01 if group_size is None else torch.rand(70, 7) * 0.01
    bias = torch.randn(70)
    got = int8_weight_only_linear(x.cuda(), w_q.cuda(), w_scale.cuda(), bias.cuda(), group_size=group_size).cpu()
    ref = int8_weight_only_linear(x, w_q, w_scale, bias, group_size=group_size)
    torch.testing.assert_close(got, ref, atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=2e-2)


def test_packing_is_cpu_only():
    with pytest.raises(ValueError, match="CUDA needs no packing"):
        pack_int8_weight(torch.zeros(3, 4, dtype=torch.int8, device="meta"))


def test_k_past_exact_int32_accumulation_is_refused(isa):
    """K * 128 * 128 must fit int32: K = 140000 of 127s wrapped to -2.04e9 (exact 2.26e9)."""
    a = torch.full((1, 140000), 127, dtype=torch.int8)
    with pytest.raises(ValueError, match="K must be <= 131071"):
        int8_gemm(a, a, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="K must be <= 131071"):
        int8_gemm(a, a, torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="K must be <= 131071"):
        pack_int8_weight(a)
    k = 131071  # the largest exact K, at the extreme products (-128 * -128 everywhere)
    a = torch.full((1, k), -128, dtype=torch.int8)
    assert int(int8_gemm(a, a, out_dtype=torch.int32)[0, 0]) == 128 * 128 * k


def test_overlapping_rows_are_read_as_given(isa):
    """Expanded (stride-0) operands: b_q gave 'int8_pack_b: bad sizes', a_q 'bad strides'."""
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-128, 128, (1, 40), dtype=torch.int8, generator=g).expand(3, 40)
    b_row = torch.randint(-128, 128, (1, 40), dtype=torch.int8, generator=g)
    b = b_row.expand(5, 40)
    want = a.long() @ b.long().T
    assert torch.equal(int8_gemm(a, b, out_dtype=torch.int32).long(), want)
    with pytest.raises(ValueError, match="rows must not overlap"):
        pack_int8_weight(b)
    # the weight-only linear (was "_C: int8_weight_only_linear: bad pointers or strides"), and
    # prepared: both equal the call on the contiguous copy
    x, s = torch.randn(3, 40, generator=g), torch.rand(5, generator=g) * 0.02
    want = int8_weight_only_linear(x, b.contiguous(), s)
    assert torch.equal(int8_weight_only_linear(x, b, s), want)
    prepared = prepare_int8_weight_only_linear(b, s)
    assert torch.equal(prepared(x), want)
    b_row[0, 0] += 1  # the expanded row, written in place: the prepared copy follows
    assert torch.equal(prepared(x), int8_weight_only_linear(x, b.contiguous(), s))
