"""ringfuse.layers.Linear with float weights: which rows take which kernel (ringfuse's
per-row kernel, its GEMM, torch's bf16 GEMM), checked by the bits each path gives."""

import pytest
import torch
import torch.nn.functional as F

from ringfuse import _C, ops
from ringfuse.layers import Linear
from ringfuse.layers import linear as layer_linear
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


@pytest.mark.parametrize("native", [True, False], ids=["torch-bf16-native", "torch-bf16-slow"])
@pytest.mark.parametrize("isa", ["avx512vnni", "avx2"])
def test_bf16_rows_past_the_bound_follow_the_host(isa, native, monkeypatch):
    """bf16 weights: up to BF16_KERNEL_MAX_M rows ringfuse's kernel (alone bits); past it
    F.linear where torch's bf16 GEMM is native (AVX-512 BF16 / AMX), else ops.linear again
    (its per-row kernel, then its GEMM)."""
    if isa == "avx512vnni" and not _C.build_info()["cpu_has_avx512_vnni"]:
        pytest.skip("no AVX-512 VNNI on this CPU")
    monkeypatch.setattr(layer_linear, "torch_bf16_gemm_is_native", lambda: native)
    w, b = _case(torch.bfloat16)
    bound = BF16_KERNEL_MAX_M
    x = torch.randn(3 * ROW_KERNEL_MAX_M, w.shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with isa_level(isa):
        layer = Linear(w, b, "none", torch.bfloat16)
        at_bound = layer(x[:bound])
        alone = torch.cat([ops.linear(x[r : r + 1], w, b) for r in range(bound)])
        for m in (bound + 1, ROW_KERNEL_MAX_M + 1, x.shape[0]):
            want = F.linear(x[:m], w, b) if native else ops.linear(x[:m], w, b)
            assert torch.equal(layer(x[:m]), want), m
    assert torch.equal(at_bound, alone)
    want = F.linear(x[:bound].double(), w.double(), b.double())
    assert torch.allclose(at_bound.double(), want, rtol=2e-2, atol=2e-2 * w.shape[1] ** 0.5)


def test_torch_bf16_gemm_is_native_follows_the_cpu_and_onednn_cap(monkeypatch):
    """Native where the CPU has AVX-512 BF16 or AMX and ONEDNN_MAX_CPU_ISA does not hold
    oneDNN below them."""
    info = _C.build_info()
    has = info["cpu_has_avx512_bf16"] or info["cpu_has_amx"]
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert layer_linear.torch_bf16_gemm_is_native() == has
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert layer_linear.torch_bf16_gemm_is_native() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert layer_linear.torch_bf16_gemm_is_native() == has


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"quant": "w8a4"}, ValueError, "quant must be one of"),  # was built as a w8a8 layer
    ({"quant": None}, ValueError, "quant must be one of"),
    ({"dtype": "fp32"}, TypeError, "dtype must be a float torch.dtype"),
    ({"weight": torch.randn(8)}, ValueError, "weight must be a float \\[N, K\\] tensor"),
    ({"weight": torch.ones(4, 8, dtype=torch.int32)}, ValueError, "weight must be a float"),
    ({"weight": iter([torch.randn(2, 8), torch.randn(2, 7)])}, ValueError, "got shape \\(2, 7\\)"),
    ({"weight": iter([])}, ValueError, "weight has no rows"),
])  # fmt: skip
def test_bad_arguments_are_refused(kwargs, exc, match):
    args = {"weight": torch.randn(4, 8), "bias": None, "quant": "none", "dtype": torch.float32, **kwargs}
    with pytest.raises(exc, match=match):
        Linear(**args)
