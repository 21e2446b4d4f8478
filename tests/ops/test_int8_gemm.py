"""ringfuse.ops.quantize_per_token on CPU (AVX2 and scalar) vs torch's formula, bitwise."""

import pytest
import torch

from ringfuse import _C
from ringfuse.ops import quantize_per_token

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
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_per_token(x.cuda())
