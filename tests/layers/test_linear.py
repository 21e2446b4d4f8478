"""ringfuse.layers.Linear with float weights: which rows take ringfuse's kernel and which
take torch's GEMM (KERNEL_MAX_M), checked by the bits each path gives."""

import pytest
import torch
import torch.nn.functional as F

from ringfuse import ops
from ringfuse.layers import Linear
from ringfuse.layers.linear import KERNEL_MAX_M


def _case(dtype, n=48, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_up_to_the_bound_take_the_kernel_and_the_rest_torch(dtype):
    """Up to KERNEL_MAX_M rows (64 for fp32 weights: a short prompt prefills there too) each
    row gets the bits the kernel gives it alone; past it, F.linear's."""
    w, b = _case(dtype)
    layer = Linear(w, b, "none", dtype)
    bound = KERNEL_MAX_M[dtype]
    assert bound == {torch.float32: 64, torch.bfloat16: 8}[dtype]
    x = torch.randn(bound + 1, w.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    at_bound = layer(x[:bound])
    alone = torch.cat([ops.linear(x[r : r + 1], w, b) for r in range(bound)])
    assert torch.equal(at_bound, alone)
    assert torch.equal(layer(x), F.linear(x, w, b))
    want = F.linear(x[:bound].double(), w.double(), b.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(at_bound.double(), want, rtol=tol, atol=tol * w.shape[1] ** 0.5)
