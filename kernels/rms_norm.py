"""RMSNorm forward in Triton, with the residual add fused in (vLLM's fused_add_rms_norm).

    s    = x                        or  round_x(x + residual)   (written to residual_out)
    rstd = 1 / sqrt(mean(s^2) + eps)                            (fp32)
    torch mode (F.rms_norm):      y = round_out(s * rstd * w)
    llama mode (HF LlamaRMSNorm): y = round_out(round_x(s * rstd) * w)

One program per row. Two kernels:
- ``_rms_norm_fwd_row_kernel``: the whole row in registers (BLOCK = next_pow2(hidden),
  at least 256): one read of the row, one write.
- ``_rms_norm_fwd_looped_kernel``: hidden > MAX_ROW_BLOCK: two passes over the row in
  LOOP_BLOCK chunks (pass 1: sum of squares, residual_out written; pass 2: normalize,
  reading s back: from residual_out when there is a residual, else from x). The second
  read of a row mostly hits L2 (a 64K-wide bf16 row is 128 KiB).

Napkin math per call (rows R, hidden H, element sizes bx (x), bo (out), bw (weight)):
  row kernel:    bytes = R*H*(bx + bo) + H*bw              (+ R*H*2*bx with a residual:
                 residual read + residual_out write); flops ~ 4*R*H (+ R*H for the add),
                 ~1 flop per byte: memory-bound, the target is the GPU's copy bandwidth.
                 E.g. R = 4096, H = 4096, bf16 in and out: 64 MiB, ~34 us at A100-80G's
                 2.0 TB/s, ~20 us at H100 SXM's 3.35 TB/s; with the residual, 128 MiB.
                 Decode (R = 1..64) is launch-bound (a few us), not bandwidth-bound.
  looped kernel: one more read of the row: + R*H*bx (mostly from L2).

Aliasing: ``out`` may be ``x`` and ``residual_out`` may be ``residual`` (in place): every
program touches only its own row, and within a row each element is read (by the thread
that owns it) before that thread writes it; the looped kernel re-reads s from
residual_out only after a CTA barrier.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._norm_common import (  # noqa: F401  (re-exported: tests and compile checks read them)
    DTYPES as _DTYPES,
    LOOP_BLOCK,
    LOOP_WARPS,
    MAX_ROW_BLOCK,
    MIN_BLOCK,
    TL_NAME as _TL_NAME,
    bucket_sizes as _bucket_sizes,
    check_args,
    load_row_sum,
    pick,
    reload_row_sum,
    row_args,
    stride0,
)
from ._launch import launch


@triton.jit
def _rms_norm_fwd_row_kernel(
    out_ptr,  # *out_dtype [rows, n_cols]: the normalized output (may be x_ptr)
    out_row_stride,  # elements between rows of out
    x_ptr,  # *x_dtype [rows, n_cols]: input, inner stride 1
    x_row_stride,  # elements between rows of x
    res_ptr,  # *x_dtype [rows, n_cols]: residual to add (unused unless HAS_RESIDUAL)
    res_row_stride,  # elements between rows of residual
    res_out_ptr,  # *x_dtype [rows, n_cols]: round_x(x + residual) (may be res_ptr)
    res_out_row_stride,  # elements between rows of residual_out
    w_ptr,  # *w_dtype [n_cols]: weight, x's dtype or fp32 (unused unless HAS_WEIGHT)
    n_cols,  # hidden size
    eps,  # fp32 epsilon added to mean(s^2)
    HAS_RESIDUAL: tl.constexpr,  # add residual first and write residual_out
    HAS_WEIGHT: tl.constexpr,  # multiply by w (else w = 1)
    LLAMA_CAST: tl.constexpr,  # round s * rstd to x's dtype before the weight (HF order)
    BLOCK: tl.constexpr,  # power of two >= n_cols: the whole row lives in registers
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if HAS_WEIGHT:
        # issued first so its latency overlaps the row load and the reduction
        w = tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    s = load_row_sum(
        x_ptr + row * x_row_stride, res_ptr + row * res_row_stride, res_out_ptr + row * res_out_row_stride,
        cols, mask, HAS_RESIDUAL,
    )  # fmt: skip
    # masked lanes are 0 and add nothing; IEEE sqrt/div: once per row, free
    mean_sq = tl.div_rn(tl.sum(s * s, axis=0), tl.cast(n_cols, tl.float32))
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    y = s * rstd
    if LLAMA_CAST:
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        y = y * w
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_looped_kernel(
    out_ptr,  # *out_dtype [rows, n_cols]: the normalized output (may be x_ptr)
    out_row_stride,  # elements between rows of out
    x_ptr,  # *x_dtype [rows, n_cols]: input, inner stride 1
    x_row_stride,  # elements between rows of x
    res_ptr,  # *x_dtype [rows, n_cols]: residual to add (unused unless HAS_RESIDUAL)
    res_row_stride,  # elements between rows of residual
    res_out_ptr,  # *x_dtype [rows, n_cols]: round_x(x + residual) (may be res_ptr)
    res_out_row_stride,  # elements between rows of residual_out
    w_ptr,  # *w_dtype [n_cols]: weight, x's dtype or fp32 (unused unless HAS_WEIGHT)
    n_cols,  # hidden size
    eps,  # fp32 epsilon added to mean(s^2)
    HAS_RESIDUAL: tl.constexpr,  # add residual first and write residual_out
    HAS_WEIGHT: tl.constexpr,  # multiply by w (else w = 1)
    LLAMA_CAST: tl.constexpr,  # round s * rstd to x's dtype before the weight (HF order)
    BLOCK: tl.constexpr,  # chunk width: the row is walked twice in BLOCK-wide chunks
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    res_row = res_ptr + row * res_row_stride
    res_out_row = res_out_ptr + row * res_out_row_stride
    # pass 1: per-lane partial sums of s^2 (one cross-lane reduction at the end)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = load_row_sum(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL)
        acc += s * s
    mean_sq = tl.div_rn(tl.sum(acc, axis=0), tl.cast(n_cols, tl.float32))
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    if HAS_RESIDUAL:
        # pass 2 reads s back from residual_out (residual may be residual_out): make this
        # CTA's pass-1 stores visible to every thread of the CTA first
        tl.debug_barrier()
    # pass 2: normalize; an element of out is written only after it was read (out may be x)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = reload_row_sum(x_row, res_out_row, cols, mask, HAS_RESIDUAL)
        y = s * rstd
        if LLAMA_CAST:
            y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            y = y * w
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Config choice: shared by the launcher and SHIPPED_CONFIGS (what the compile test builds)


def _pick(n_cols: int):
    """(kernel, BLOCK, num_warps) for a row of n_cols elements."""
    return pick(n_cols, _rms_norm_fwd_row_kernel, _rms_norm_fwd_looped_kernel)


def _spec(x_dtype, out_dtype, w_dtype, has_residual: bool, llama_cast: bool, n_cols: int):
    """Everything that selects a compiled variant: kernel, argument types, constexprs, warps."""
    kernel, block, num_warps = _pick(n_cols)
    xt, ot = _TL_NAME[x_dtype], _TL_NAME[out_dtype]
    wt = _TL_NAME[w_dtype] if w_dtype is not None else xt  # x is passed as the dummy
    signature = {
        "out_ptr": f"*{ot}", "out_row_stride": "i32",
        "x_ptr": f"*{xt}", "x_row_stride": "i32",
        "res_ptr": f"*{xt}", "res_row_stride": "i32",
        "res_out_ptr": f"*{xt}", "res_out_row_stride": "i32",
        "w_ptr": f"*{wt}", "n_cols": "i32", "eps": "fp32",
    }  # fmt: skip
    constexprs = {
        "HAS_RESIDUAL": bool(has_residual),
        "HAS_WEIGHT": w_dtype is not None,
        # rounding s * rstd to fp32 is the identity: one variant for fp32 x
        "LLAMA_CAST": bool(llama_cast) and x_dtype != torch.float32,
        "BLOCK": block,
    }
    for k in constexprs:
        signature[k] = "constexpr"
    return kernel, signature, constexprs, num_warps


def shipped_configs():
    """Every (kernel, signature, constexprs, num_warps) the launcher can choose, as dicts
    with an ``id``; argument ints are i32 (Triton's JIT also specializes ints == 1 and
    multiples of 16, which changes attributes, not the variants listed here)."""
    configs, seen = [], set()
    for n_cols in _bucket_sizes():
        for x_dt in _DTYPES:
            for out_dt in dict.fromkeys((x_dt, torch.float32)):
                for w_dt in dict.fromkeys((None, x_dt, torch.float32)):
                    for has_res in (False, True):
                        for llama in (False, True):
                            kernel, sig, cexp, nw = _spec(x_dt, out_dt, w_dt, has_res, llama, n_cols)
                            key = (kernel.__name__, tuple(sig.items()), tuple(cexp.items()), nw)
                            if key in seen:
                                continue
                            seen.add(key)
                            name = "looped" if kernel is _rms_norm_fwd_looped_kernel else "row"
                            cid = (
                                f"rms_{name}-B{cexp['BLOCK']}-w{nw}-x{_TL_NAME[x_dt]}-o{_TL_NAME[out_dt]}"
                                f"-w{_TL_NAME[w_dt] if w_dt else 'none'}-res{int(has_res)}"
                                f"-llama{int(cexp['LLAMA_CAST'])}"
                            )
                            configs.append(
                                {"id": cid, "kernel": kernel, "signature": sig, "constexprs": cexp, "num_warps": nw}
                            )
    return configs


SHIPPED_CONFIGS = shipped_configs()


@functools.lru_cache(maxsize=1024)
def _plan(x_dtype, out_dtype, w_dtype, has_residual: bool, llama_cast: bool, n_cols: int):
    """(kernel, constexprs, num_warps) for a launch, cached: the hot path is per token."""
    kernel, _, constexprs, num_warps = _spec(x_dtype, out_dtype, w_dtype, has_residual, llama_cast, n_cols)
    return kernel, constexprs, num_warps


# ---------------------------------------------------------------------------------------
# Launcher


def rms_norm_fwd(out, x, weight, eps, llama_cast=False, residual=None, residual_out=None) -> None:
    """out[r, :] = RMSNorm(s[r, :]) with s = x or round_x(x + residual) (-> residual_out).

    x, residual, residual_out: [rows, hidden], inner stride 1, any row stride; residual and
    residual_out have x's dtype (both given or both None). out: [rows, hidden], x's dtype or
    fp32. weight: None or [hidden] contiguous, x's dtype or fp32. In place is fine:
    ``out is x`` and ``residual_out is residual``. The caller validates devices and values.
    """
    check_args("rms_norm_fwd", out, x, {"weight": weight}, residual, residual_out)
    rows, n_cols = x.shape
    rms_norm_rows(out, out.stride(0), residual_out, stride0(residual_out), x, x.stride(0), residual, stride0(residual),
                  weight, rows, n_cols, eps, llama_cast)  # fmt: skip


def rms_norm_rows(out, out_stride, residual_out, residual_out_stride, x, x_stride, residual, residual_stride,
                  weight, rows, n_cols, eps, llama_cast) -> None:  # fmt: skip
    """rms_norm_fwd without its checks, with ringfuse.ops.native.rms_norm's arguments (each
    tensor by its data, rows ``*_stride`` elements apart), for ringfuse.ops, which has
    checked everything."""
    if rows == 0:
        return
    kernel, constexprs, num_warps = _plan(
        x.dtype, out.dtype, None if weight is None else weight.dtype, residual is not None, bool(llama_cast), n_cols
    )
    launch(kernel, (rows,),
        *row_args(rows, n_cols, out, out_stride, residual_out, residual_out_stride, x, x_stride, residual,
                  residual_stride),
        x if weight is None else weight,
        n_cols,
        float(eps),
        **constexprs,
        num_warps=num_warps,
    )  # fmt: skip
