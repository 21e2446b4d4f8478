"""kernels/silu_mul.py (the CUDA path of ops.silu_mul / gelu_tanh_mul) under the Triton
interpreter vs an fp64 reference, special values as torch, strided rows, the ops' CUDA
dispatch (tests/fake_cuda.py), and its shipped configs compiled for sm_80 / sm_90 with no
spills."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from ..fake_cuda import as_cuda
from .triton_helpers import assert_configs_compile, interp_only

from ringfuse import ops
from ringfuse.kernels import compile_check
from ringfuse.kernels import silu_mul as triton_gated

pytestmark = [
    pytest.mark.usefixtures("interpreter_bf16_round_to_nearest_even"),
    # the interpreter runs the kernel's fp32 math in numpy: e^-a overflowing to inf is meant
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ["silu_mul", "gelu_tanh_mul"]


def torch_gated(op, x):
    d = x.shape[-1] // 2
    a = F.silu(x[..., :d]) if op == "silu_mul" else F.gelu(x[..., :d], approximate="tanh")
    return a * x[..., d:]


def ulps(got, ref, dtype):
    """|got - ref| in units of the last place of ref rounded to dtype."""
    r = ref.to(dtype)
    ulp = (torch.nextafter(r, torch.full_like(r, float("inf"))).double() - r.double()).abs()
    return (got.double() - ref).abs() / ulp


def run(op, x):
    d = x.shape[-1] // 2
    out = torch.full((x.shape[0], d), float("nan"), dtype=x.dtype)
    triton_gated.gated_mul_fwd(out, x, op)
    return out


@interp_only
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,d", [(1, 1), (3, 7), (2, 1024), (2, 2500)], ids=str)
def test_matches_reference(op, dtype, rows, d):
    """ARCHITECTURE.md's tolerance rule; for SiLU also the README's bounds element by
    element (16-bit: within 1 ulp of the exact value; fp32 within 3). GELU's tail (a < -3)
    has no such bound: u = sqrt(2/pi) (a + 0.044715 a^3) is rounded to fp32 before e^(-2u),
    whose relative error then grows with |u| (torch's fp32 formula gives 0 there). d 2500:
    three programs per row, the last one partly masked."""
    g = torch.Generator().manual_seed(rows * 7 + d)
    x = (4 * torch.randn(rows, 2 * d, generator=g)).to(dtype)
    got = run(op, x)
    ref = torch_gated(op, x.double())
    err = float((got.double() - ref).abs().max())
    terr = float((torch_gated(op, x).double() - ref).abs().max())
    floor = torch.finfo(dtype).eps / 2 * float(ref.abs().max())
    assert err <= 2 * terr + floor, f"error {err:.3g} vs torch {terr:.3g} (floor {floor:.3g})"
    if op == "silu_mul":
        assert float(ulps(got, ref, dtype).max()) < (3.0 if dtype == torch.float32 else 1.0)


@interp_only
@pytest.mark.parametrize("op", OPS)
def test_special_values_as_torch(op):
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, 20.0, -20.0, 100.0, -100.0, float("inf"), float("-inf"), float("nan")])
    n = len(vals)
    x = torch.cat([vals.repeat_interleave(n), vals.repeat(n)])[None]  # every (gate, up) pair
    got, want = run(op, x), torch_gated(op, x)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].isinf(), want[finite].isinf()) and torch.equal(got[finite].sign(), want[finite].sign())
    assert torch.allclose(got[finite], want[finite], rtol=1e-6, atol=0), (got, want)


@interp_only
def test_strided_rows_and_out_untouched_past_the_rows():
    """x as every other row of a wider buffer (row stride != 2 d), out a slice of a bigger
    buffer: outputs land in their rows only."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(8, 2 * 300 + 5, generator=g).to(torch.bfloat16)
    x = big[::2, 2 : 2 + 600]
    out_big = torch.full((4, 310), -7.0, dtype=torch.bfloat16)
    out = out_big[:, :300]
    triton_gated.gated_mul_fwd(out, x, "silu_mul")
    assert torch.equal(out, run("silu_mul", x.contiguous()))
    assert (out_big[:, 300:] == -7.0).all()


@interp_only
@pytest.mark.parametrize("op", OPS)
def test_ops_take_the_triton_kernel_on_cuda_tensors(op, monkeypatch):
    """ops.silu_mul / gelu_tanh_mul on a CUDA tensor: the Triton kernel (not torch's two
    kernels), for [..., 2 d] inputs with leading dims and strided rows."""
    ops_gated = importlib.import_module("ringfuse.ops.silu_mul")  # the module (ops.silu_mul is the function)
    monkeypatch.setattr(ops_gated, "_torch", lambda *a: pytest.fail("took the torch fallback"))
    g = torch.Generator().manual_seed(11)
    big = torch.randn(2, 3, 2 * 40 + 4, generator=g).to(torch.float16)
    x = big[..., : 2 * 40]
    got = getattr(ops, op)(as_cuda(x))
    assert got.shape == (2, 3, 40) and got.dtype == torch.float16
    assert torch.equal(got, run(op, x.reshape(6, 80)).view(2, 3, 40))
    # 2-D inputs go to the kernel as they are: strided rows, and one row expanded (stride 0)
    flat = big.view(6, 84)[:, :80]
    assert torch.equal(getattr(ops, op)(as_cuda(flat)), run(op, flat.contiguous()))
    one = flat[:1].expand(4, 80)
    assert torch.equal(getattr(ops, op)(as_cuda(one)), run(op, flat[:1]).expand(4, 40))


def test_shipped_configs_compile_without_spills():
    configs = [c for c in triton_gated.SHIPPED_CONFIGS if c["signature"]["x_ptr"] in ("*bf16", "*fp32")]
    assert_configs_compile(compile_check.__name__, "silu_mul", configs)
