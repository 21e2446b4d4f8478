"""ringfuse.layers.Linear with float weights: which rows take which kernel (ringfuse's
per-row kernel, its GEMM, torch's bf16 GEMM), checked by the bits each path gives."""

import pytest
import torch
import torch.nn.functional as F

from ringfuse import _C, ops
from ringfuse.layers import Linear
from ringfuse.layers.linear import BF16_KERNEL_MAX_M
from ringfuse.ops.linear import ROW_KERNEL_MAX_M

from ..ops.isa import isa_level


def _case(dtype, n=48, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2"])
def test_fp32_rows_take_the_row_kernel_then_the_gemm(isa):
    """fp32 weights: up to ROW_KERNEL_MAX_M rows each row gets the bits the kernel gives it
    alone; more rows (a prefill) take ringfuse's GEMM (ops.linear's bits, not F.linear's),
    within the tolerance of the fp64 result."""
    if isa == "avx512vnni" and not _C.build_info()["cpu_has_avx512_vnni"]:
        pytest.skip("no AVX-512 VNNI on this CPU")
    w, b = _case(torch.float32)
    x = torch.randn(3 * ROW_KERNEL_MAX_M + 5, w.shape[1], generator=torch.Generator().manual_seed(1))
    with isa_level(isa):
        layer = Linear(w, b, "none", torch.float32)
        at_bound = layer(x[:ROW_KERNEL_MAX_M])
        alone = torch.cat([ops.linear(x[r : r + 1], w, b) for r in range(ROW_KERNEL_MAX_M)])
        past = layer(x)
        gemm = ops.linear(x, w, b)
    assert torch.equal(at_bound, alone)
    assert torch.equal(past, gemm)
    assert not torch.equal(past[:ROW_KERNEL_MAX_M], alone)  # the GEMM sums in another order
    want = F.linear(x.double(), w.double(), b.double())
    assert torch.allclose(past.double(), want, rtol=1e-5, atol=1e-5 * w.shape[1] ** 0.5)


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2"])
def test_bf16_rows_up_to_the_bound_take_the_kernel_and_the_rest_torch(isa):
    """bf16 weights: up to BF16_KERNEL_MAX_M rows ringfuse's kernel (alone bits), past it
    F.linear (torch's bf16 GEMM)."""
    if isa == "avx512vnni" and not _C.build_info()["cpu_has_avx512_vnni"]:
        pytest.skip("no AVX-512 VNNI on this CPU")
    w, b = _case(torch.bfloat16)
    bound = BF16_KERNEL_MAX_M
    with isa_level(isa):
        layer = Linear(w, b, "none", torch.bfloat16)
        x = torch.randn(bound + 1, w.shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        at_bound = layer(x[:bound])
        alone = torch.cat([ops.linear(x[r : r + 1], w, b) for r in range(bound)])
        past = layer(x)
    assert torch.equal(at_bound, alone)
    assert torch.equal(past, F.linear(x, w, b))
    want = F.linear(x[:bound].double(), w.double(), b.double())
    assert torch.allclose(at_bound.double(), want, rtol=2e-2, atol=2e-2 * w.shape[1] ** 0.5)
