"""kernels/int8_gemm.py under the Triton interpreter (bitwise vs the torch formula) and its
shipped configs compiled for sm_80 / sm_90 with no spills."""

from __future__ import annotations


import pytest
import torch

from .triton_helpers import assert_configs_compile, interp_only

try:
    from ringfuse.kernels import compile_check
    from ringfuse.kernels import int8_gemm as triton_int8
except ImportError:
    from kernels import compile_check
    from kernels import int8_gemm as triton_int8



def reference(x):
    xf = x.float()
    scale = xf.abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[:, None] > 0, torch.round(xf / safe[:, None]).clamp(-127, 127), 0.0)
    return q.to(torch.int8), scale


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 7, 300, 1025, 5000])
def test_quantize_matches_reference(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(5, k, generator=g) * 3).to(dtype)
    x[1] = 0
    if k >= 8:
        x[2, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0, 126.5]).to(dtype)  # ties
    x[4, 0] = float("nan")
    q, scale = torch.empty(5, k, dtype=torch.int8), torch.empty(5)
    triton_int8.quantize_per_token_fwd(q, scale, x)
    ref_q, ref_scale = reference(x[:4])
    assert torch.equal(q[:4], ref_q) and torch.equal(scale[:4], ref_scale)
    assert bool(torch.isnan(scale[4])) and bool((q[4] == 0).all())


def test_shipped_configs_compile_without_spills():
    bf16 = [c for c in triton_int8.SHIPPED_CONFIGS if c["signature"]["x_ptr"] == "*bf16"]
    assert_configs_compile(compile_check.__name__, "int8_gemm", bf16)
