"""int8 in Triton: the CUDA path of ``ringfuse.ops`` quantize_per_token, int8_gemm (W8A8)
and int8_weight_only_linear (W8A16).

Kernels
- ``_quantize_per_token_kernel``: one program per row: pass 1 takes max |x| over the row
  in BLOCK chunks, pass 2 writes q = round_half_even(x / scale) with scale = max / 127 (a
  zero row: scale 0, q 0), the same fp32 math as the CPU kernel (csrc/cpu/int8_gemm.cpp)
  and torch's reference. A row with inf or NaN gets scale NaN and q 0, and raises the
  device_errors flag (no sync: ringfuse.ops.check_device_errors reports it).
- ``_int8_gemm_kernel``: W8A8. 1-D grid over [BLOCK_M, BLOCK_N] output tiles, grouped
  GROUP_M tile rows at a time (the B panels of a group stay in L2). acc = a_q b_q^T by
  tl.dot of int8 tiles into an int32 accumulator (mma.sync m16n8k32.s8 on sm_80; on sm_90
  Triton emits wgmma for the BLOCK_M >= 64 tiles): exact for K < 2^31 / 128^2 = 131072.
  Epilogue: int32 out stores acc as is; float out stores (fp32(acc) * a_scale[m]) *
  b_scale[n] (+ bias[n]) rounded once to out's dtype. fp32(acc) is exact while |acc| <=
  2^24 (K <= 1024 at full-range inputs), else a 2^-24 relative rounding, below the int8
  quantization error by far. Tiles by M bucket (16 / 64 / larger) and alignment (below).
- ``_weight_only_kernel``: W8A16 (x fp32 / fp16 / bf16, w int8 [N, K]). Grid (M tiles,
  N tiles, splits). Each [BLOCK_N, BLOCK_K] int8 weight tile is converted in registers to
  x's dtype, which is exact (|w| <= 128 fits the 8-bit significand of bf16), and goes
  through tl.dot with fp32 accumulation; the scales never round into the operands.
  Per-channel scale ([N]): applied once in the epilogue. Per-group scale ([N, cdiv(K, g)],
  g a multiple of 16): BLOCK_K = min(tile's BLOCK_K, largest power of two dividing g), so
  no K tile straddles a group; each tile's dot lands in a fresh fp32 partial that is
  scaled by its group's [BLOCK_N] scales and added to acc (one [BLOCK_M, BLOCK_N] FMA per
  tile). The last group may be partial: masked K lanes load 0 for both operands.
  fp32 x: fp32 operands with input_precision="ieee" (no tf32), so fp32 keeps fp32 accuracy.
- ``_split_k_reduce_kernel``: decode-sized M (the BLOCK_M = 16 tile) with too few output
  tiles to fill the GPU splits K into num_splits contiguous runs of whole K tiles; each
  (tile, split) program writes its fp32 partial to a workspace [splits, M, N] (no atomics),
  and this kernel sums the splits in index order (deterministic: bitwise identical run to
  run), applies the per-channel scale and bias, and casts.

Napkin math
  int8_gemm, M = N = K = 4096: 2 M N K = 137 G int8 ops; bytes >= M K + N K + M N * 2
  (bf16 out) = 67 MB (tiles are re-read from L2, not HBM, within a GROUP_M group): ~2000
  ops per byte, compute-bound for M above a few hundred. Targets: A100 624 TOPS int8 dense
  (0.22 ms); H100 SXM 1979 TOPS dense (wgmma; not tuned for here: no TMA, no warp
  specialization).
  At M <= 16 it is bound by b's N K bytes, like the weight-only kernel below.
  weight_only, M = 1, K = N = 4096: the int8 weights are 16.8 MB (per-group scales add 4
  bytes per g weights: +12.5% at g = 32), x and out are 8 KB each: ~5.0 us at H100 SXM's
  3.35 TB/s, ~8.4 us at A100-80G's 2.0 TB/s. 2 M N K = 34 MFLOP: negligible. It stays
  bandwidth-bound while 2 M flops per weight byte < the tensor-core peak / bandwidth
  (~300 on H100 bf16 dense), so through all of decode (M <= 16, BLOCK_M 16, one M tile)
  the weight bytes are the whole cost. Split-K's workspace moves 2 * splits * M * N * 4
  bytes: 98 KB at M = 1, N = 4096, 3 splits (0.6% of the weights).
  Keeping HBM busy needs about bandwidth x latency ~ 3.35 TB/s x ~0.7 us ~ 2.3 MB in flight,
  ~18 KB per SM on H100's 132: a 32 x 256 weight tile is 8 KB and num_stages = 3 keeps two
  in flight per program, so the decode plan aims at >= 2 programs per SM
  (SPLIT_TARGET_PROGRAMS).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from . import device_errors
from ._launch import cdiv, is_aligned, launch  # is_aligned: of ALIGNED_ARGS, per launch

_ERR_NONFINITE = device_errors.slot(device_errors.NONFINITE)

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
    err_ptr,  # *i32 [1]: device_errors flag (a row with inf or NaN)
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
    device_errors.raise_if(err_ptr, _ERR_NONFINITE, ~finite)
    m = tl.max(amax, 0)
    scale = tl.div_rn(m, 127.0)  # `/` is div.full.f32 (2 ulp): not the CPU's scale bits
    tl.store(scale_ptr + row, tl.where(finite, scale, float("nan")))
    safe = tl.where(finite & (m > 0.0), scale, 1.0)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * x_stride + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.div_rn(x, safe), -127.0), 127.0)
        r = tl.floor(y + 0.5)  # round half to even: ties that landed on an odd value go down
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)
        r = tl.where(finite & (m > 0.0), r, 0.0)
        tl.store(q_ptr + row * q_stride + k0 + offs, r.to(tl.int8), mask=mask)



@triton.jit
def _int8_gemm_kernel(
    out_ptr,  # *out_dtype [M, N]: fp32 / bf16 / fp16 (scaled) or i32 (raw product)
    o_sm,  # row stride of out (column stride 1)
    a_ptr,  # *i8 [M, K]: activations, unit stride along K
    a_sm,  # row stride of a
    b_ptr,  # *i8 [N, K]: weights, unit stride along K
    b_sn,  # row stride of b
    a_scale_ptr,  # *fp32 [M]: per-row scale of a (unused unless SCALED)
    b_scale_ptr,  # *fp32 [N]: per-row scale of b (unused unless SCALED)
    bias_ptr,  # *fp32 [N] (unused unless HAS_BIAS)
    M,  # rows of a and out
    N,  # rows of b, columns of out
    K,  # reduction length
    SCALED: tl.constexpr,  # float out: acc * a_scale * b_scale (+ bias); else raw int32
    HAS_BIAS: tl.constexpr,  # add bias (SCALED only)
    BLOCK_M: tl.constexpr,  # out rows per program
    BLOCK_N: tl.constexpr,  # out columns per program
    BLOCK_K: tl.constexpr,  # K per step, a multiple of 32 (int8 mma k32)
    GROUP_M: tl.constexpr,  # tile rows walked together (L2 reuse of b's panels)
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * a_sm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * b_sn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)  # exact int32
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * o_sm + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SCALED:
        a_s = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        b_s = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _weight_only_kernel(
    out_ptr,  # *dtype [M, N]: output (unused with SPLIT)
    o_sm,  # row stride of out (column stride 1)
    ws_ptr,  # *fp32 [splits, M, N]: contiguous partial sums (unused unless SPLIT)
    x_ptr,  # *dtype [M, K]: activations, unit stride along K
    x_sm,  # row stride of x
    w_ptr,  # *i8 [N, K]: weights, unit stride along K
    w_sn,  # row stride of w
    scale_ptr,  # *fp32 [N] (per channel) or [N, cdiv(K, group_size)] (GROUPED), unit stride along groups
    s_sn,  # row stride of scale (per channel: its only stride)
    bias_ptr,  # *fp32 [N] (unused unless HAS_BIAS)
    M,  # rows of x and out
    N,  # rows of w, columns of out
    K,  # reduction length
    group_size,  # K per scale group (GROUPED; a multiple of BLOCK_K)
    k_per_split,  # K per split, a multiple of BLOCK_K (K itself without SPLIT)
    GROUPED: tl.constexpr,  # per-group scales, applied per K tile; else per channel, in the epilogue
    HAS_BIAS: tl.constexpr,  # add bias (never with SPLIT: the reduction adds it)
    SPLIT: tl.constexpr,  # write the fp32 partial of split program_id(2) to ws
    DOT_FP32: tl.constexpr,  # fp32 dot operands (fp32 x; and the interpreter, whose bf16 dot is wrong)
    BLOCK_M: tl.constexpr,  # x rows per program
    BLOCK_N: tl.constexpr,  # w rows per program
    BLOCK_K: tl.constexpr,  # K per step (divides group_size when GROUPED)
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_mask = offs_m < M
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * x_sm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + n64[:, None] * w_sn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x_ptr.dtype.element_ty)  # exact: |w| <= 128
        if GROUPED:
            s = tl.load(scale_ptr + n64 * s_sn + k0 // group_size, mask=n_mask, other=0.0)  # [BLOCK_N]
            part = tl.dot(x, tl.trans(w), input_precision="ieee")
            acc += part * s[None, :]
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")

    if SPLIT:
        ws_ptrs = ws_ptr + (split.to(tl.int64) * M + offs_m[:, None]) * N + n64[None, :]
        tl.store(ws_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        if not GROUPED:
            acc = acc * tl.load(scale_ptr + n64 * s_sn, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * o_sm + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _split_k_reduce_kernel(
    out_ptr,  # *dtype [M, N]: output
    o_sm,  # row stride of out (column stride 1)
    ws_ptr,  # *fp32 [splits, M, N]: contiguous partial sums
    scale_ptr,  # *fp32 [N]: per-channel scale (unused unless PER_CHANNEL)
    s_sn,  # stride of scale
    bias_ptr,  # *fp32 [N] (unused unless HAS_BIAS)
    M,  # rows of out
    N,  # columns of out
    num_splits,  # partials per element
    PER_CHANNEL: tl.constexpr,  # multiply by scale[n] (per-group scales are already in)
    HAS_BIAS: tl.constexpr,  # add bias
    BLOCK: tl.constexpr,  # columns per program
):  # fmt: skip
    """Grid (M, cdiv(N, BLOCK)): out[m, n] = sum_s ws[s, m, n] (in split order) * scale[n] + bias[n]."""
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_n < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, num_splits):  # fixed order: deterministic
        acc += tl.load(ws_ptr + (s * M + m) * N + offs_n, mask=mask, other=0.0)
    if PER_CHANNEL:
        acc = acc * tl.load(scale_ptr + offs_n.to(tl.int64) * s_sn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask, other=0.0)
    tl.store(out_ptr + m * o_sm + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)



# ---------------------------------------------------------------------------------------
# Config choice: shared by the launchers and SHIPPED_CONFIGS (what the compile test builds)

# Under TRITON_INTERPRET=1 @triton.jit gives interpreter objects. Their tl.dot is numpy's
# matmul on the raw data: int8 x int8 -> int32 is exact (checked bit for bit against torch's
# int64 product in the tests), but bf16 is held as raw 16-bit integers, so a bf16 dot is
# wrong; the weight-only kernel upcasts its operands to fp32 there (the products of bf16 /
# fp16 values are exact in fp32 either way). Compiled kernels never take this path.
INTERPRETING = not isinstance(_weight_only_kernel, JITFunction)

GEMM_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32)
OUT_TL_NAME = {**TL_NAME, torch.int32: "i32"}
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
M_BUCKETS = (16, 64, None)  # M <= 16 (decode), M <= 64, larger
DECODE = M_BUCKETS[0]

# Tiles are picked per M bucket and per alignment. "Aligned" (ALIGNED_ARGS all multiples of
# 16: the operands' pointers in bytes, their row strides and K in elements) is what Triton's
# JIT specializes on at launch: the loads become 16-byte vectors and cp.async feeds the
# num_stages pipeline. Otherwise (odd K, odd row strides, offset views) every int8 is its
# own load into its own register, no cp.async: a slow fallback whose tiles are sized so it
# still fits in registers. Every shipped config compiles for sm_80 and sm_90 without spills
# (the compile test; RINGFUSE_COMPILE_ALL=1 builds all of them: at most 234 registers, in
# the aligned 128 x 128 GEMM tile on sm_90, at most 96 KiB of shared memory). num_stages
# is Triton's default 3, which is also what the compile check builds (it takes no
# num_stages). Tiles that spilled or came near 255 registers when tried are noted below.
ALIGNED_ARGS = {
    "_int8_gemm_kernel": ("a_ptr", "b_ptr", "a_sm", "b_sn", "K"),
    # group_size is always a multiple of 16 (the per-channel launch passes BLOCK_K), and so
    # is k_per_split when aligned or split
    "_weight_only_kernel": ("x_ptr", "w_ptr", "x_sm", "w_sn", "K", "group_size", "k_per_split"),
}
ALWAYS_DIVISIBLE_ARGS = {"_weight_only_kernel": ("group_size",)}

# int8 GEMM (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) per (aligned, M bucket). Aligned, large
# M: (BLOCK_M + BLOCK_N) * BLOCK_K bytes per stage (32 KiB at 128 x 128 x 128). 4 warps on
# 64 x 128 x 128 spill: 8 warps there.
_GEMM_TILES = {
    (True, 16): (16, 64, 128, 4),
    (True, 64): (64, 128, 128, 8),
    (True, None): (128, 128, 128, 8),
    (False, 16): (16, 32, 128, 4),  # 16 x 64 x 64: 215 registers
    (False, 64): (64, 64, 32, 4),  # 64 x 64 x 64 and 64 x 128 x 32 spill
    (False, None): (64, 64, 32, 4),
}
GEMM_GROUP_M = 8

# weight-only (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) per (aligned, 16-bit x, M bucket).
# Decode: BLOCK_M 16 (tl.dot's minimum; one tile covers M <= 16), a 32 x 256 int8 weight
# tile (8 KB) per step. fp32 x takes the FMA path of tl.dot (ieee), whose operands and
# accumulator all live in registers: smaller K steps (16 x 32 x 128 at 4 warps spills).
_WO_TILES = {
    (True, True, 16): (16, 32, 256, 4),
    (True, True, 64): (64, 64, 64, 4),
    (True, True, None): (128, 64, 64, 8),  # 128 x 128 x 64 needs 253-255 registers: too close
    (True, False, 16): (16, 32, 64, 8),  # 16 x 32 x 64 at 4 warps: 255
    (True, False, 64): (64, 64, 16, 8),  # 64 x 64 x 32 and 64 x 64 x 16 at 4 warps spill
    (True, False, None): (64, 64, 16, 8),
    (False, True, 16): (16, 32, 64, 4),  # 16 x 32 x 128: 230 registers
    (False, True, 64): (64, 64, 32, 8),  # 64 x 64 x 32 at 4 warps: 252
    (False, True, None): (64, 64, 32, 8),
    (False, False, 16): (16, 32, 32, 4),
    (False, False, 64): (64, 64, 16, 8),
    (False, False, None): (64, 64, 16, 8),
}
MIN_GROUP = 16  # group sizes must be multiples of 16 (tl.dot needs K tiles >= 16)
REDUCE_BLOCK, REDUCE_WARPS = 512, 4
# split-K (decode bucket only): aim for >= SPLIT_TARGET_PROGRAMS programs (2 per SM on a
# 132-SM H100), each split at least MIN_K_TILES_PER_SPLIT K tiles (32 KB of weights with
# the aligned bf16 tile), at most MAX_SPLITS
SPLIT_TARGET_PROGRAMS = 264
MIN_K_TILES_PER_SPLIT = 4
MAX_SPLITS = 16


def m_bucket(m: int):
    return 16 if m <= 16 else 64 if m <= 64 else None  # M_BUCKETS


def _int_sig(names):
    return {n: "i32" for n in names}


def _gemm_spec(out_dtype, aligned: bool, bucket, has_bias: bool):
    block_m, block_n, block_k, nw = _GEMM_TILES[(aligned, bucket)]
    scaled = out_dtype != torch.int32
    side = "*fp32" if scaled else "*i32"  # int32 out: the launcher passes out as the unused pointers
    sig = {"out_ptr": f"*{OUT_TL_NAME[out_dtype]}", "o_sm": "i32", "a_ptr": "*i8", "a_sm": "i32",
           "b_ptr": "*i8", "b_sn": "i32", "a_scale_ptr": side, "b_scale_ptr": side, "bias_ptr": side,
           **_int_sig(["M", "N", "K"])}  # fmt: skip
    cexp = {"SCALED": scaled, "HAS_BIAS": bool(has_bias and scaled), "BLOCK_M": block_m, "BLOCK_N": block_n,
            "BLOCK_K": block_k, "GROUP_M": GEMM_GROUP_M}  # fmt: skip
    sig.update({k: "constexpr" for k in cexp})
    return _int8_gemm_kernel, sig, cexp, nw


def _wo_tile(dtype, aligned: bool, bucket):
    return _WO_TILES[(aligned, dtype != torch.float32, bucket)]


def wo_block_k(dtype, aligned: bool, bucket, group_size) -> int:
    """The tile's BLOCK_K, or for per-group scales the largest power of two <= it that
    divides group_size (a K tile never straddles two groups)."""
    block_k = _wo_tile(dtype, aligned, bucket)[2]
    if group_size is None:
        return block_k
    return min(block_k, group_size & -group_size)


def _wo_spec(dtype, aligned: bool, bucket, block_k: int, grouped: bool, has_bias: bool, split: bool,
             dot_fp32: bool = False):  # fmt: skip
    block_m, block_n, _, nw = _wo_tile(dtype, aligned, bucket)
    t = TL_NAME[dtype]
    sig = {"out_ptr": f"*{t}", "o_sm": "i32", "ws_ptr": "*fp32", "x_ptr": f"*{t}", "x_sm": "i32", "w_ptr": "*i8",
           "w_sn": "i32", "scale_ptr": "*fp32", "s_sn": "i32", "bias_ptr": "*fp32",
           **_int_sig(["M", "N", "K", "group_size", "k_per_split"])}  # fmt: skip
    cexp = {"GROUPED": bool(grouped), "HAS_BIAS": bool(has_bias and not split), "SPLIT": bool(split),
            "DOT_FP32": bool(dot_fp32 or dtype == torch.float32),
            "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}  # fmt: skip
    sig.update({k: "constexpr" for k in cexp})
    return _weight_only_kernel, sig, cexp, nw


def _reduce_spec(dtype, per_channel: bool, has_bias: bool):
    sig = {"out_ptr": f"*{TL_NAME[dtype]}", "o_sm": "i32", "ws_ptr": "*fp32", "scale_ptr": "*fp32", "s_sn": "i32",
           "bias_ptr": "*fp32", **_int_sig(["M", "N", "num_splits"])}  # fmt: skip
    cexp = {"PER_CHANNEL": bool(per_channel), "HAS_BIAS": bool(has_bias), "BLOCK": REDUCE_BLOCK}
    sig.update({k: "constexpr" for k in cexp})
    return _split_k_reduce_kernel, sig, cexp, REDUCE_WARPS


def _wo_block_ks(dtype, aligned: bool, bucket):
    """Every BLOCK_K the weight-only launcher can pick for a tile: the tile's own (per
    channel, or a group size it divides) and each smaller power of two >= MIN_GROUP."""
    top = wo_block_k(dtype, aligned, bucket, None)
    return [top >> i for i in range(top.bit_length()) if top >> i >= MIN_GROUP]


def _block(k: int) -> int:
    return next(b for b in BLOCKS if b >= min(triton.next_power_of_2(k), BLOCKS[-1]))


def quantize_num_warps(block: int) -> int:
    """1 warp for BLOCK 256, 8 from 1024 (4 and 16 elements per thread). Memory-bound: one
    row of K elements read twice, written once as int8; the warp count moves no bytes, it
    only splits the row finer. 4 warps at 1024 (bf16: 8 elements, 32 registers) spilled 4-8
    bytes with ptxas held to 32 registers; 8 warps fit 32 without spills, and at 4096 need
    78 registers instead of 128 (spill-free down to a limit of 64)."""
    return 8 if block >= 1024 else 1


def _spec(dtype, k: int):
    block = _block(k)
    sig = {"q_ptr": "*i8", "q_stride": "i32", "scale_ptr": "*fp32", "x_ptr": f"*{TL_NAME[dtype]}",
           "x_stride": "i32", "K": "i32", "err_ptr": "*i32", "BLOCK": "constexpr"}  # fmt: skip
    return _quantize_per_token_kernel, sig, {"BLOCK": block}, quantize_num_warps(block)


def _bucket_id(bucket) -> str:
    return f"m{bucket}" if bucket is not None else "mbig"


def shipped_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers can choose on a GPU,
    as dicts with an ``id`` and ``aligned`` (whether the launcher picks it only when every
    ALIGNED_ARGS argument is a multiple of 16, as the JIT then specializes them; argument
    ints as i32; Triton's JIT also specializes ints == 1 and other multiples of 16, which
    changes attributes, not the variants listed here). All run with Triton's default
    num_stages (3), which is also what the compile check builds."""
    configs = [{"id": f"quantize-{TL_NAME[dt]}-B{b}", "kernel": k, "signature": sig, "constexprs": cexp,
                "num_warps": nw, "aligned": False}
               for dt in TL_NAME for b in BLOCKS for k, sig, cexp, nw in [_spec(dt, b)]]  # fmt: skip

    seen = set()

    def add(cid, spec, aligned):  # buckets that share a tile share its configs: listed once
        kernel, sig, cexp, nw = spec
        key = (kernel.__name__, tuple(sig.items()), tuple(cexp.items()), nw, aligned)
        if key not in seen:
            seen.add(key)
            configs.append({"id": cid, "kernel": kernel, "signature": sig, "constexprs": cexp, "num_warps": nw,
                            "aligned": aligned})  # fmt: skip

    for al in (True, False):
        for bucket in M_BUCKETS:
            for odt in GEMM_OUT_DTYPES:
                for bias in (False, True) if odt != torch.int32 else (False,):
                    add(f"gemm-{OUT_TL_NAME[odt]}-al{int(al)}-{_bucket_id(bucket)}-bias{int(bias)}",
                        _gemm_spec(odt, al, bucket, bias), al)  # fmt: skip
    for dt in X_DTYPES:
        t = TL_NAME[dt]
        for al in (True, False):
            for bucket in M_BUCKETS:
                top = wo_block_k(dt, al, bucket, None)
                for bk in _wo_block_ks(dt, al, bucket):
                    for grouped in (False, True) if bk == top else (True,):
                        modes = [(False, False), (True, False)] + ([(False, True)] if bucket == DECODE else [])
                        for bias, split in modes:  # with split-K the reduction adds the bias
                            cid = f"wo-{t}-al{int(al)}-{_bucket_id(bucket)}-K{bk}-g{int(grouped)}-bias{int(bias)}"
                            add(f"{cid}-split{int(split)}", _wo_spec(dt, al, bucket, bk, grouped, bias, split), al)
        for per_channel in (False, True):
            for bias in (False, True):
                add(f"wo_reduce-{t}-pc{int(per_channel)}-bias{int(bias)}", _reduce_spec(dt, per_channel, bias), False)
    return configs


SHIPPED_CONFIGS = shipped_configs()


@functools.lru_cache(maxsize=256)
def _plan(dtype, k):
    kernel, _, cexp, nw = _spec(dtype, k)
    return kernel, cexp, nw


@functools.lru_cache(maxsize=256)
def _gemm_plan(out_dtype, aligned, bucket, has_bias):
    kernel, _, cexp, nw = _gemm_spec(out_dtype, aligned, bucket, has_bias)
    return kernel, cexp, nw


def num_splits_for(n: int, k: int, block_n: int, block_k: int) -> tuple[int, int]:
    """(splits, K per split) of the decode bucket's split-K: enough programs to cover
    SPLIT_TARGET_PROGRAMS, at least MIN_K_TILES_PER_SPLIT K tiles each, at most MAX_SPLITS;
    every split non-empty."""
    k_tiles = cdiv(k, block_k)
    splits = min(MAX_SPLITS, cdiv(SPLIT_TARGET_PROGRAMS, cdiv(n, block_n)),
                 k_tiles // MIN_K_TILES_PER_SPLIT)  # fmt: skip
    return _splits(k_tiles, block_k, max(1, splits))


def _splits(k_tiles: int, block_k: int, splits: int) -> tuple[int, int]:
    tiles_per_split = cdiv(k_tiles, min(splits, k_tiles))
    return cdiv(k_tiles, tiles_per_split), tiles_per_split * block_k


@functools.lru_cache(maxsize=1024)
def _wo_plan(dtype, aligned, bucket, n, k, group_size, has_bias, split_k):
    """(kernel, constexprs, num_warps, splits, K per split, reduce kernel, its constexprs,
    its num_warps): the reduction is None without split-K."""
    block_k = wo_block_k(dtype, aligned, bucket, group_size)
    block_n = _wo_tile(dtype, aligned, bucket)[1]
    if split_k is not None:
        if split_k < 1 or (split_k > 1 and bucket != DECODE):
            raise ValueError(f"weight_only_fwd: split_k must be >= 1, and 1 unless M <= {DECODE}; got {split_k}")
        splits, k_per_split = _splits(cdiv(k, block_k), block_k, split_k)
    elif bucket == DECODE:
        splits, k_per_split = num_splits_for(n, k, block_n, block_k)
    else:
        splits, k_per_split = 1, k
    split = splits > 1
    grouped = group_size is not None
    kernel, _, cexp, nw = _wo_spec(dtype, aligned, bucket, block_k, grouped, has_bias, split, INTERPRETING)
    if not split:
        return kernel, cexp, nw, 1, k, None, None, None
    k2, _, cexp2, nw2 = _reduce_spec(dtype, not grouped, has_bias)
    return kernel, cexp, nw, splits, k_per_split, k2, cexp2, nw2


# ---------------------------------------------------------------------------------------
# Launchers


def quantize_per_token_fwd(q, scale, x) -> None:
    """x [rows, K] (inner stride 1) -> q int8 [rows, K], scale fp32 [rows] (NaN marks a
    row with inf / NaN; q is 0 there, and the device_errors flag is raised)."""
    rows, k = x.shape
    if rows == 0:
        return
    kernel, cexp, nw = _plan(x.dtype, k)
    launch(kernel, (rows,), q, q.stride(0), scale, x, x.stride(0), k, device_errors.flag(x.device), **cexp,
           num_warps=nw)  # fmt: skip


def int8_gemm_fwd(out, a_q, b_q, a_scale, b_scale, bias) -> None:
    """out = (a_q @ b_q^T) [* a_scale[:, None] * b_scale[None, :] + bias[None, :]].

    Preconditions (checked by the caller, ringfuse.ops; nothing is re-checked here):
    a_q int8 [M, K], b_q int8 [N, K], out [M, N], M, N, K >= 1 (M or N 0: nothing to do,
    returns), all on one CUDA device (CPU under the interpreter); a_q, b_q unit stride along
    K (any row stride), out unit column stride (any row stride); out dtype float32 /
    bfloat16 / float16 with a_scale fp32 [M] and b_scale fp32 [N] contiguous (unit stride)
    and bias None or fp32 [N] contiguous, or out int32 with a_scale, b_scale and bias all
    None (the raw int32 product). K < 131072 keeps the int32 accumulation exact
    (K * 128 * 128 < 2^31). out must not overlap the inputs. Pointers 16-byte aligned and
    row strides and K multiples of 16 take the fast tiles; anything else is correct but
    takes the byte-load fallback (see ALIGNED_ARGS).
    """
    m, k = a_q.shape
    n = b_q.shape[0]
    if m == 0 or n == 0:
        return
    aligned = is_aligned((a_q, b_q), (a_q.stride(0), b_q.stride(0), k))
    kernel, cexp, nw = _gemm_plan(out.dtype, aligned, m_bucket(m), bias is not None)
    if cexp["SCALED"]:
        side = (a_scale, b_scale, bias if bias is not None else a_scale)  # unused bias: any fp32 pointer
    else:
        side = (out, out, out)  # never touched
    grid = (cdiv(m, cexp["BLOCK_M"]) * cdiv(n, cexp["BLOCK_N"]),)
    launch(kernel, grid,
        out, out.stride(0),
        a_q, a_q.stride(0),
        b_q, b_q.stride(0),
        *side,
        m, n, k,
        **cexp,
        num_warps=nw,
    )  # fmt: skip


def weight_only_fwd(out, x, w_q, w_scale, bias, group_size, split_k=None) -> None:
    """out = x @ (w_q * scale)^T + bias, fp32 accumulation (W8A16).

    Preconditions (checked by the caller, ringfuse.ops; nothing is re-checked here):
    x float32 / bfloat16 / float16 [M, K], unit stride along K (any row stride); w_q int8
    [N, K], unit stride along K; out [M, N] of x's dtype, unit column stride, not
    overlapping the inputs; K >= 1 (M or N 0: returns); bias None or fp32 [N] contiguous.
    group_size None: w_scale fp32 [N] (per output channel, any stride); group_size an int,
    a positive multiple of 16: w_scale fp32 [N, cdiv(K, group_size)] with unit stride along
    the groups (any row stride); column j of w scales by group j // group_size (the last
    group may be partial). All on one CUDA device (CPU under the interpreter). x and w_q
    16-byte aligned with row strides and K multiples of 16 take the fast tiles; anything
    else is correct but slower (see ALIGNED_ARGS).
    split_k: None picks the split count for M <= 16 (num_splits_for; larger M never
    splits); an int forces it (tests): >= 1, and 1 unless M <= 16 (ValueError otherwise),
    clamped to the number of K tiles. With more than one split a fp32 workspace
    [splits, M, N] is allocated and a second kernel sums it in a fixed order.
    """
    m, k = x.shape
    n = w_q.shape[0]
    if m == 0 or n == 0:
        return
    aligned = is_aligned((x, w_q), (x.stride(0), w_q.stride(0), k))
    kernel, cexp, nw, splits, k_per_split, k2, cexp2, nw2 = _wo_plan(
        x.dtype, aligned, m_bucket(m), n, k, group_size, bias is not None, split_k)
    grouped = group_size is not None
    s_sn = w_scale.stride(0)
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if k2 is not None else w_scale
    grid = (cdiv(m, cexp["BLOCK_M"]), cdiv(n, cexp["BLOCK_N"]), splits)
    launch(kernel, grid,
        out, out.stride(0),
        ws,
        x, x.stride(0),
        w_q, w_q.stride(0),
        w_scale, s_sn,
        bias if bias is not None else w_scale,  # unused without bias: any fp32 pointer
        m, n, k,
        group_size if grouped else cexp["BLOCK_K"],  # unused per channel (never 1: no extra specialization)
        k_per_split,
        **cexp,
        num_warps=nw,
    )  # fmt: skip
    if k2 is not None:
        launch(k2, (m, cdiv(n, cexp2["BLOCK"])),
            out, out.stride(0), ws, w_scale, s_sn, bias if bias is not None else w_scale, m, n, splits,
            **cexp2, num_warps=nw2,
        )  # fmt: skip
