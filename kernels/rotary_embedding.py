"""Rotary position embedding in Triton, in place: the CUDA path of
``ringfuse.ops.rotary_embedding`` (the CPU path is csrc/cpu/rotary_embedding.cpp).

Token t at position p = positions[t] rotates, in every head, the pairs (x1, x2) of its first
rot_dim dims by the angles of cache row p (cos in columns [0, rot_dim/2), sin in
[rot_dim/2, rot_dim)): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, in fp32 with one
rounding to x's dtype. Pairs: (i, i + rot_dim/2) for neox ("rotate half", Llama), (2i, 2i+1)
for GPT-J.

Grid (T, cdiv(heads, BLOCK_H)); a program loads its token's cos/sin row once and rotates
BLOCK_H heads. Napkin math: bytes = 2 x T x heads x rot_dim x elem (read + write) + T x
rot_dim x 4 (cache rows), ~3 flops per element: bandwidth-bound.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import device_errors
from ._launch import cdiv, launch

_ERR_POSITIONS = device_errors.slot(device_errors.POSITIONS)

TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
HEADS_PER_PROGRAM = 4
HALF_BUCKETS = (16, 32, 64, 128)  # next_pow2(rot_dim / 2), rot_dim <= 256


@triton.jit
def _rotary_kernel(
    x_ptr,  # *dtype [T, heads, D]: rotated in place
    x_st, x_sh,  # token / head strides of x (inner stride 1)
    pos_ptr,  # *i64 [T]: positions; one outside [0, max_positions) leaves its token as is
    cache_ptr,  # *fp32 [max_positions, rot_dim]: cos | sin
    cache_stride,  # row stride of the cache
    max_positions,  # rows of the cache
    err_ptr,  # *i32 [1]: device_errors flag
    heads,  # heads of x
    half,  # rot_dim / 2
    GPTJ: tl.constexpr,  # interleaved pairs, else rotate half
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_R: tl.constexpr,  # next_pow2(half)
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < half
    pos = tl.load(pos_ptr + t)
    ok = (pos >= 0) & (pos < max_positions)
    device_errors.raise_if(err_ptr, _ERR_POSITIONS, ~ok & (tl.program_id(1) == 0))
    r_mask = r_mask & ok  # a bad position: nothing read or written
    cos = tl.load(cache_ptr + pos * cache_stride + offs_r, mask=r_mask, other=0.0)
    sin = tl.load(cache_ptr + pos * cache_stride + half + offs_r, mask=r_mask, other=0.0)
    if GPTJ:
        i1 = 2 * offs_r
        i2 = i1 + 1
    else:
        i1 = offs_r
        i2 = offs_r + half
    base = x_ptr + t * x_st + offs_h[:, None].to(tl.int64) * x_sh
    mask = (offs_h[:, None] < heads) & r_mask[None, :]
    x1 = tl.load(base + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(base + i1[None, :], out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + i2[None, :], out2.to(x_ptr.dtype.element_ty), mask=mask)


def _block_r(half: int) -> int:
    return max(HALF_BUCKETS[0], triton.next_power_of_2(half))


def _spec(dtype, half: int, gptj: bool):
    sig = {"x_ptr": f"*{TL_NAME[dtype]}", "x_st": "i32", "x_sh": "i32", "pos_ptr": "*i64", "cache_ptr": "*fp32",
           "cache_stride": "i32", "max_positions": "i32", "err_ptr": "*i32", "heads": "i32", "half": "i32"}  # fmt: skip
    cexp = {"GPTJ": bool(gptj), "BLOCK_H": HEADS_PER_PROGRAM, "BLOCK_R": _block_r(half)}
    sig.update({k: "constexpr" for k in cexp})
    return _rotary_kernel, sig, cexp, 1 if _block_r(half) <= 32 else 2


def shipped_configs():
    """Every (kernel, signature, constexprs, num_warps) the launcher can choose."""
    return [{"id": f"rotary-{TL_NAME[dt]}-R{br}-{'gptj' if gptj else 'neox'}", "kernel": k, "signature": sig,
             "constexprs": cexp, "num_warps": nw}
            for dt in TL_NAME for br in HALF_BUCKETS for gptj in (False, True)
            for k, sig, cexp, nw in [_spec(dt, br, gptj)]]  # fmt: skip


SHIPPED_CONFIGS = shipped_configs()


@functools.lru_cache(maxsize=256)
def _plan(dtype, half, gptj):
    kernel, _, cexp, nw = _spec(dtype, half, gptj)
    return kernel, cexp, nw


def rotary_embedding_fwd(x, positions, cos_sin_cache, gptj: bool) -> None:
    """Rotate x [T, heads, D] in place (inner stride 1). positions: int64 [T] within the
    cache's rows (a token whose position is not stays as it is and raises the
    device_errors flag); cos_sin_cache: fp32 [max_positions, rot_dim], rot_dim even and
    <= D."""
    T, heads, _ = x.shape
    if T == 0 or heads == 0:
        return
    half = cos_sin_cache.shape[1] // 2
    kernel, cexp, nw = _plan(x.dtype, half, bool(gptj))
    grid = (T, cdiv(heads, cexp["BLOCK_H"]))
    launch(kernel, grid, x, x.stride(0), x.stride(1), positions, cos_sin_cache, cos_sin_cache.stride(0),
           cos_sin_cache.shape[0], device_errors.flag(x.device), heads, half, **cexp, num_warps=nw)  # fmt: skip
