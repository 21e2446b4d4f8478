"""kernels/int8_gemm.py under the Triton interpreter (bitwise vs the torch formula) and its
shipped configs compiled for sm_80 / sm_90 with no spills."""

from __future__ import annotations

import os

import pytest
import torch

from .compile_jobs import compile_in_child, max_regs

try:
    from ringfuse.kernels import compile_check
    from ringfuse.kernels import int8_gemm as triton_int8
except ImportError:
    from kernels import compile_check
    from kernels import int8_gemm as triton_int8

interp_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (TRITON_INTERPRET=1)"
)


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
    jobs = [{"module": "int8_gemm", "kernel": cfg["kernel"].__name__, "signature": cfg["signature"],
             "constexprs": cfg["constexprs"], "arch": arch, "num_warps": cfg["num_warps"]}
            for cfg in triton_int8.SHIPPED_CONFIGS if cfg["signature"]["x_ptr"] == "*bf16" for arch in (80, 90)]  # fmt: skip
    for job, res in zip(jobs, compile_in_child(compile_check.__name__, jobs)):
        assert res["targets_arch"] and res["cubin_len"] > 0
        assert res["n_spills"] == 0, (job["constexprs"], job["arch"], res)
        assert 0 < res["n_regs"] <= max_regs(job["num_warps"])
