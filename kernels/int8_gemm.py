"""int8 quantization in Triton: the CUDA path of ``ringfuse.ops.quantize_per_token``.

One program per row: pass 1 takes max |x| over the row in BLOCK chunks, pass 2 writes
q = round_half_even(x / scale) with scale = max / 127 (a zero row: scale 0, q 0), the same
fp32 math as the CPU kernel (csrc/cpu/int8_gemm.cpp) and torch's reference. Rows with inf
or NaN are flagged (scale NaN) for the launcher's caller to report. Napkin math: x is read
twice (the second time from L2 for rows up to a few MB) and 1 byte per element written:
memory-bound.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BLOCKS = (256, 1024, 4096)  # elements per chunk: next_pow2(K) up to 4096


@triton.jit
def _quantize_per_token_kernel(
    q_ptr,  # *i8 [rows, K]
    q_stride,  # row stride of q
    scale_ptr,  # *fp32 [rows]
    x_ptr,  # *dtype [rows, K]
    x_stride,  # row stride of x
    K,  # columns
    BLOCK: tl.constexpr,  # elements per chunk
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)  # x * 0: NaN for inf / NaN, sticky in a sum
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * x_stride + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
        bad += x * 0.0
    finite = tl.sum(bad, 0) == 0.0
    m = tl.max(amax, 0)
    scale = m / 127.0
    tl.store(scale_ptr + row, tl.where(finite, scale, float("nan")))
    safe = tl.where(finite & (m > 0.0), scale, 1.0)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * x_stride + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x / safe, -127.0), 127.0)
        r = tl.floor(y + 0.5)  # round half to even: ties that landed on an odd value go down
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)
        r = tl.where(finite & (m > 0.0), r, 0.0)
        tl.store(q_ptr + row * q_stride + k0 + offs, r.to(tl.int8), mask=mask)


def _block(k: int) -> int:
    return next(b for b in BLOCKS if b >= min(triton.next_power_of_2(k), BLOCKS[-1]))


def _spec(dtype, k: int):
    block = _block(k)
    sig = {"q_ptr": "*i8", "q_stride": "i32", "scale_ptr": "*fp32", "x_ptr": f"*{TL_NAME[dtype]}",
           "x_stride": "i32", "K": "i32", "BLOCK": "constexpr"}  # fmt: skip
    return _quantize_per_token_kernel, sig, {"BLOCK": block}, 4 if block >= 1024 else 1


def shipped_configs():
    """Every (kernel, signature, constexprs, num_warps) the launcher can choose."""
    return [{"id": f"quantize-{TL_NAME[dt]}-B{b}", "kernel": k, "signature": sig, "constexprs": cexp, "num_warps": nw}
            for dt in TL_NAME for b in BLOCKS for k, sig, cexp, nw in [_spec(dt, b)]]  # fmt: skip


SHIPPED_CONFIGS = shipped_configs()


@functools.lru_cache(maxsize=256)
def _plan(dtype, k):
    kernel, _, cexp, nw = _spec(dtype, k)
    return kernel, cexp, nw


def quantize_per_token_fwd(q, scale, x) -> None:
    """x [rows, K] (inner stride 1) -> q int8 [rows, K], scale fp32 [rows] (NaN marks a
    row with inf / NaN; q is 0 there)."""
    rows, k = x.shape
    if rows == 0:
        return
    kernel, cexp, nw = _plan(x.dtype, k)
    kernel[(rows,)](q, q.stride(0), scale, x, x.stride(0), k, **cexp, num_warps=nw)
