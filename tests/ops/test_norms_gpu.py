"""The norm ops on CUDA tensors through both CUDA backends (Triton, CUDA C++). Marked gpu:
skipped on machines without a device, run as written on a GPU box."""

import pytest
import torch

import sys

from ringfuse import _C, ops
from ringfuse.ops._common import plain_call, plain_outputs

from .norm_reference import assert_within_tolerance, ln_ref64, ln_torch, rms_ref64, rms_torch

BACKENDS = ["triton"] + (["cuda"] if hasattr(_C, "rms_norm_cuda") else [])
pytestmark = pytest.mark.gpu


@pytest.fixture(params=BACKENDS)
def backend(request):
    prev = ops.cuda_backend()
    ops.set_cuda_backend(request.param)
    yield request.param
    ops.set_cuda_backend(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 577), (130, 4096), (2, 16384), (4, 65536)], ids=str)
def test_norms_on_cuda(backend, dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    r = torch.randn(shape, device="cuda", generator=g).to(dtype)
    w = (torch.rand(shape[-1], device="cuda", generator=g) + 0.5).to(dtype)
    b = (torch.randn(shape[-1], device="cuda", generator=g) * 0.1).to(dtype)
    for llama in (False, True):
        got = ops.rms_norm(x, w, 1e-6, cast_mode="llama" if llama else "torch")
        assert_within_tolerance(got, rms_ref64(x, w, 1e-6, llama=llama), rms_torch(x, w, 1e-6, llama=llama),
                                backend, rounding_dtype=dtype if llama else None)
    out, s = ops.add_rms_norm(x, r, w)
    assert torch.equal(s, x + r)
    assert_within_tolerance(out, rms_ref64(x, w, 1e-6, r), rms_torch(x, w, 1e-6, r), backend)
    assert_within_tolerance(ops.layer_norm(x, w, b), ln_ref64(x, w, b, 1e-5), ln_torch(x, w, b, 1e-5), backend)
    out, s = ops.add_layer_norm(x, r, w, b)
    assert torch.equal(s, x + r)
    assert_within_tolerance(out, ln_ref64(x, w, b, 1e-5, r), ln_torch(x, w, b, 1e-5, r), backend)
    # in place and strided rows
    xi, ri = x.clone(), r.clone()
    expect_out, expect_res = ops.add_rms_norm(x, r, w)
    ops.add_rms_norm_(xi, ri, w)
    assert torch.equal(xi, expect_out) and torch.equal(ri, expect_res)
    big = torch.randn(shape[0], shape[1] + 8, device="cuda", generator=g).to(dtype)
    xs = big[:, 3 : 3 + shape[1]]
    assert_within_tolerance(ops.rms_norm(xs, w), rms_ref64(xs, w, 1e-6), rms_torch(xs, w, 1e-6), backend)


def test_plain_calls_take_the_unchecked_path_with_the_full_paths_bits(backend):
    """Contiguous CUDA calls skip the ops' checks (plain_call) and give the bits of the
    checked path; a tensor on another device is left to the checks."""
    rms, ln = sys.modules["ringfuse.ops.rms_norm"], sys.modules["ringfuse.ops.layer_norm"]
    for dtype in (torch.float32, torch.bfloat16):
        x, r = torch.randn(5, 576, device="cuda").to(dtype), torch.randn(5, 576, device="cuda").to(dtype)
        w, b = (torch.rand(576, device="cuda") + 0.5).to(dtype), torch.randn(576, device="cuda").to(dtype)
        assert plain_call(x, 1e-6, r, w, b) and plain_outputs(x, (torch.empty_like(x), r), (x, r), (w, b))
        assert not plain_call(x, 1e-6, r.cpu(), w) and not plain_call(x, 1e-6, None, w.cpu())
        assert not plain_outputs(x, (torch.empty_like(x).cpu(),), (x,), (w,))
        for llama in (False, True):
            assert torch.equal(ops.rms_norm(x, w, 1e-6, cast_mode="llama" if llama else "torch"),
                               rms._forward(x, w, 1e-6, llama)[0])  # fmt: skip
        for got, want in zip(ops.add_rms_norm(x, r, w), rms._forward(x, w, 1e-6, False, residual=r)):
            assert torch.equal(got, want)
        assert torch.equal(ops.layer_norm(x, w, b), ln._forward(x, w, b, 1e-5)[0])
        for got, want in zip(ops.add_layer_norm(x, r, w, b), ln._forward(x, w, b, 1e-5, residual=r)):
            assert torch.equal(got, want)
        out, s = torch.empty_like(x), r.clone()
        ops.add_rms_norm(x, s, w, out=out, residual_out=s)  # in place on the residual
        want = rms._forward(x, w, 1e-6, False, residual=r)
        assert torch.equal(out, want[0]) and torch.equal(s, want[1])


def test_cuda_matches_cpu(backend):
    """Same inputs on CPU and CUDA agree within the tolerance rule (different sum orders)."""
    x = torch.randn(64, 576)
    w = torch.rand(576) + 0.5
    cpu = ops.rms_norm(x, w)
    gpu = ops.rms_norm(x.cuda(), w.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_autograd_and_compile_on_cuda(backend):
    x = torch.randn(4, 96, device="cuda", requires_grad=True)
    w = torch.rand(96, device="cuda", requires_grad=True)
    ops.rms_norm(x, w).sum().backward()
    assert x.grad is not None and w.grad is not None
    f = torch.compile(lambda a, b: ops.layer_norm(a, b, None), fullgraph=True)
    torch.testing.assert_close(f(x.detach(), w.detach()), torch.nn.functional.layer_norm(x.detach(), (96,), w.detach()))
