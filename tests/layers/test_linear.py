"""ringfuse.layers.Linear with float weights: which rows take ringfuse's kernel and which
take torch's GEMM (kernel_max_m), checked by the bits each path gives."""

import pytest
import torch
import torch.nn.functional as F

from ringfuse import _C, ops
from ringfuse.layers import Linear
from ringfuse.layers.linear import kernel_max_m

from ..ops.isa import isa_level


def _case(dtype, n=48, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_up_to_the_bound_take_the_kernel_and_the_rest_torch(dtype, isa):
    """Up to kernel_max_m rows (fp32 weights: 64 with the 16-lane kernels, 32 on the AVX2
    path, so a short prompt prefills there too; bf16: 8) each row gets the bits the kernel
    gives it alone; past it, F.linear's."""
    if isa == "avx512vnni" and not _C.build_info()["cpu_has_avx512_vnni"]:
        pytest.skip("no AVX-512 VNNI on this CPU")
    w, b = _case(dtype)
    with isa_level(isa):
        layer = Linear(w, b, "none", dtype)
        bound = kernel_max_m(dtype)
        assert bound == {torch.float32: 64 if isa == "avx512vnni" else 32, torch.bfloat16: 8}[dtype]
        x = torch.randn(bound + 1, w.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
        at_bound = layer(x[:bound])
        alone = torch.cat([ops.linear(x[r : r + 1], w, b) for r in range(bound)])
        past = layer(x)
    assert torch.equal(at_bound, alone)
    assert torch.equal(past, F.linear(x, w, b))
    want = F.linear(x[:bound].double(), w.double(), b.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(at_bound.double(), want, rtol=tol, atol=tol * w.shape[1] ** 0.5)
