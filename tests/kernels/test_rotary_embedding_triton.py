"""kernels/rotary_embedding.py under the Triton interpreter vs an fp64 reference, and its
shipped configs compiled for sm_80 / sm_90 with no spills."""

from __future__ import annotations


import pytest
import torch

from .triton_helpers import assert_configs_compile, interp_only

from ringfuse.kernels import compile_check
from ringfuse.kernels import rotary_embedding as triton_rotary

pytestmark = pytest.mark.usefixtures("interpreter_bf16_round_to_nearest_even")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference64(x, positions, cache, gptj):
    """fp64 rotation of the first rot_dim dims of x [T, H, D]."""
    x = x.double().clone()
    half = cache.shape[1] // 2
    cos, sin = cache[positions, :half].double()[:, None], cache[positions, half:].double()[:, None]
    idx = torch.arange(half)
    i1, i2 = (2 * idx, 2 * idx + 1) if gptj else (idx, idx + half)
    x1, x2 = x[..., i1].clone(), x[..., i2].clone()
    x[..., i1], x[..., i2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return x


@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gptj", [False, True])
@pytest.mark.parametrize("heads,d,rot", [(5, 64, 64), (3, 128, 32), (9, 80, 80), (2, 256, 256)], ids=str)
def test_rotary_matches_reference(dtype, gptj, heads, d, rot):
    """Within half an ulp of the fp64 rotation (fp32 math, one rounding), dims past rot_dim
    untouched, strided x (a view of a fused qkv buffer)."""
    g = torch.Generator().manual_seed(d + rot)
    base = torch.randn(7, heads + 2, d, generator=g).to(dtype)
    x = base[:, 1 : heads + 1]
    positions = torch.tensor([0, 5, 3, 3, 17, 1, 30])
    cache = torch.cat([torch.rand(31, rot // 2, generator=g), torch.rand(31, rot // 2, generator=g)], -1) * 2 - 1
    before = base.clone()
    ref = reference64(x, positions, cache, gptj)
    triton_rotary.rotary_embedding_fwd(x, positions, cache, gptj)
    err = (x.double() - ref).abs()
    ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=torch.finfo(dtype).tiny)
    assert bool((err <= ulp + 1e-6 * ref.abs().max()).all())
    assert torch.equal(base[:, 0], before[:, 0]) and torch.equal(base[:, -1], before[:, -1])
    assert torch.equal(x[..., rot:], before[:, 1 : heads + 1, rot:])


def test_shipped_configs_compile_without_spills():
    bf16 = [c for c in triton_rotary.SHIPPED_CONFIGS if c["signature"]["x_ptr"] == "*bf16"]
    assert_configs_compile(compile_check.__name__, "rotary_embedding", bf16)
