"""LayerNorm forward in Triton, with the residual add fused in.

    s    = x                        or  round_x(x + residual)   (written to residual_out)
    mean = mean(s), var = mean((s - mean)^2) (biased), rstd = 1 / sqrt(var + eps)   (fp32)
    y    = round_out((s - mean) * rstd * w + b)

One program per row. Two kernels:
- ``_layer_norm_fwd_row_kernel``: the whole row in registers (BLOCK = next_pow2(hidden),
  at least 256); corrected two-pass mean / variance over the registers (three reductions,
  the last two independent): one read, one write.
- ``_layer_norm_fwd_looped_kernel``: hidden > MAX_ROW_BLOCK: pass 1 walks the row in
  LOOP_BLOCK chunks keeping a Welford (count, mean, M2) per lane of d = s - K (K: the mean
  of the first chunk, so a large common offset costs no digits), merged at the end with
  Chan's formula (M2 = sum M2_i + sum n_i (mean_i - mean)^2): no E[x^2] - E[x]^2
  cancellation; pass 2 normalizes, reading s back (from residual_out when there is a
  residual, else from x). The second read mostly hits L2.

Napkin math per call (rows R, hidden H, element sizes bx (x), bo (out), bw (weight/bias)):
  row kernel:    bytes = R*H*(bx + bo) + 2*H*bw            (+ R*H*2*bx with a residual:
                 residual read + residual_out write); flops ~ 9*R*H, ~2 flops per byte:
                 memory-bound, the target is the GPU's copy bandwidth (R = 4096, H = 4096,
                 bf16 in and out: 64 MiB, ~34 us at 2.0 TB/s, ~20 us at 3.35 TB/s).
  looped kernel: one more read of the row: + R*H*bx (mostly from L2); ~6 more flops per
                 element for the Welford updates.

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
def _layer_norm_fwd_row_kernel(
    out_ptr,  # *out_dtype [rows, n_cols]: the normalized output (may be x_ptr)
    out_row_stride,  # elements between rows of out
    x_ptr,  # *x_dtype [rows, n_cols]: input, inner stride 1
    x_row_stride,  # elements between rows of x
    res_ptr,  # *x_dtype [rows, n_cols]: residual to add (unused unless HAS_RESIDUAL)
    res_row_stride,  # elements between rows of residual
    res_out_ptr,  # *x_dtype [rows, n_cols]: round_x(x + residual) (may be res_ptr)
    res_out_row_stride,  # elements between rows of residual_out
    w_ptr,  # *w_dtype [n_cols]: weight, x's dtype or fp32 (unused unless HAS_WEIGHT)
    b_ptr,  # *b_dtype [n_cols]: bias, x's dtype or fp32 (unused unless HAS_BIAS)
    n_cols,  # hidden size
    eps,  # fp32 epsilon added to the variance
    HAS_RESIDUAL: tl.constexpr,  # add residual first and write residual_out
    HAS_WEIGHT: tl.constexpr,  # multiply by w (else w = 1)
    HAS_BIAS: tl.constexpr,  # add b (else b = 0)
    BLOCK: tl.constexpr,  # power of two >= n_cols: the whole row lives in registers
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    s = load_row_sum(
        x_ptr + row * x_row_stride, res_ptr + row * res_row_stride, res_out_ptr + row * res_out_row_stride,
        cols, mask, HAS_RESIDUAL,
    )  # fmt: skip
    # corrected two-pass (Chan, Golub & LeVeque): d = s - mean0 with mean0 the fp32 mean;
    # c = mean(d) is mean0's rounding error, so d - c is s - mean to fp32 precision even
    # for rows with a large common offset, and var = mean(d^2) - c^2 (c^2 << var)
    n = tl.cast(n_cols, tl.float32)
    mean0 = tl.div_rn(tl.sum(s, axis=0), n)  # masked lanes are 0
    d = tl.where(mask, s - mean0, 0.0)
    c = tl.div_rn(tl.sum(d, axis=0), n)
    var = tl.maximum(tl.div_rn(tl.sum(d * d, axis=0), n) - c * c, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))  # IEEE: once per row, free
    y = (d - c) * rstd
    # weight and bias loaded late: early loads would hold 2 x BLOCK more values in registers
    # across the reductions (122 of 128 registers at BLOCK 8192); other CTAs on the SM
    # cover the latency
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        y = y * w
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        y = y + b
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_fwd_looped_kernel(
    out_ptr,  # *out_dtype [rows, n_cols]: the normalized output (may be x_ptr)
    out_row_stride,  # elements between rows of out
    x_ptr,  # *x_dtype [rows, n_cols]: input, inner stride 1
    x_row_stride,  # elements between rows of x
    res_ptr,  # *x_dtype [rows, n_cols]: residual to add (unused unless HAS_RESIDUAL)
    res_row_stride,  # elements between rows of residual
    res_out_ptr,  # *x_dtype [rows, n_cols]: round_x(x + residual) (may be res_ptr)
    res_out_row_stride,  # elements between rows of residual_out
    w_ptr,  # *w_dtype [n_cols]: weight, x's dtype or fp32 (unused unless HAS_WEIGHT)
    b_ptr,  # *b_dtype [n_cols]: bias, x's dtype or fp32 (unused unless HAS_BIAS)
    n_cols,  # hidden size
    eps,  # fp32 epsilon added to the variance
    HAS_RESIDUAL: tl.constexpr,  # add residual first and write residual_out
    HAS_WEIGHT: tl.constexpr,  # multiply by w (else w = 1)
    HAS_BIAS: tl.constexpr,  # add b (else b = 0)
    BLOCK: tl.constexpr,  # chunk width: the row is walked twice in BLOCK-wide chunks
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    res_row = res_ptr + row * res_row_stride
    res_out_row = res_out_ptr + row * res_out_row_stride
    # pass 1, chunk 0 (peeled): its mean is the shift K. Statistics are kept for d = s - K,
    # values of the row's spread rather than its offset, so neither the mean nor s - mean
    # loses digits to a large common offset (s - K is exact when s and K are within 2x).
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    s = load_row_sum(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL)
    shift = tl.div_rn(tl.sum(s, axis=0), tl.cast(tl.minimum(n_cols, BLOCK), tl.float32))
    # Welford per lane over the chunks: chunk k (0-based) gives each lane whose column is
    # in range its (k+1)-th value (only the last chunk is partial): the count is a scalar
    mean_v = tl.where(mask, s - shift, 0.0)
    m2_v = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = 1.0
    for off in range(BLOCK, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = load_row_sum(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL)
        d = s - shift
        cnt += 1.0
        inv_cnt = tl.div_rn(1.0, cnt)
        delta = d - mean_v
        mean_v = tl.where(mask, mean_v + delta * inv_cnt, mean_v)
        m2_v = tl.where(mask, m2_v + delta * (d - mean_v), m2_v)
    # per-lane counts: cnt (= number of chunks) for lanes in range in the last chunk, one
    # less for the others; then Chan's merge of the per-lane (cnt_v, mean_v, m2_v)
    last = (tl.cdiv(n_cols, BLOCK) - 1) * BLOCK
    cnt_v = tl.where(last + tl.arange(0, BLOCK) < n_cols, cnt, cnt - 1.0)
    n = tl.cast(n_cols, tl.float32)
    mean_d = tl.div_rn(tl.sum(mean_v * cnt_v, axis=0), n)  # mean = shift + mean_d
    dm = mean_v - mean_d
    var = tl.div_rn(tl.sum(m2_v + cnt_v * dm * dm, axis=0), n)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if HAS_RESIDUAL:
        # pass 2 reads s back from residual_out (residual may be residual_out): make this
        # CTA's pass-1 stores visible to every thread of the CTA first
        tl.debug_barrier()
    # pass 2: normalize; an element of out is written only after it was read (out may be x)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = reload_row_sum(x_row, res_out_row, cols, mask, HAS_RESIDUAL)
        y = ((s - shift) - mean_d) * rstd
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            y = y * w
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            y = y + b
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Config choice: shared by the launcher and SHIPPED_CONFIGS (what the compile test builds)


def _pick(n_cols: int):
    """(kernel, BLOCK, num_warps) for a row of n_cols elements."""
    return pick(n_cols, _layer_norm_fwd_row_kernel, _layer_norm_fwd_looped_kernel)


def _spec(x_dtype, out_dtype, w_dtype, b_dtype, has_residual: bool, n_cols: int):
    """Everything that selects a compiled variant: kernel, argument types, constexprs, warps."""
    kernel, block, num_warps = _pick(n_cols)
    xt, ot = _TL_NAME[x_dtype], _TL_NAME[out_dtype]
    wt = _TL_NAME[w_dtype] if w_dtype is not None else xt  # x is passed as the dummy
    bt = _TL_NAME[b_dtype] if b_dtype is not None else xt
    signature = {
        "out_ptr": f"*{ot}", "out_row_stride": "i32",
        "x_ptr": f"*{xt}", "x_row_stride": "i32",
        "res_ptr": f"*{xt}", "res_row_stride": "i32",
        "res_out_ptr": f"*{xt}", "res_out_row_stride": "i32",
        "w_ptr": f"*{wt}", "b_ptr": f"*{bt}", "n_cols": "i32", "eps": "fp32",
    }  # fmt: skip
    constexprs = {
        "HAS_RESIDUAL": bool(has_residual),
        "HAS_WEIGHT": w_dtype is not None,
        "HAS_BIAS": b_dtype is not None,
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
                    for b_dt in dict.fromkeys((None, x_dt, torch.float32)):
                        for has_res in (False, True):
                            kernel, sig, cexp, nw = _spec(x_dt, out_dt, w_dt, b_dt, has_res, n_cols)
                            key = (kernel.__name__, tuple(sig.items()), tuple(cexp.items()), nw)
                            if key in seen:
                                continue
                            seen.add(key)
                            name = "looped" if kernel is _layer_norm_fwd_looped_kernel else "row"
                            cid = (
                                f"ln_{name}-B{cexp['BLOCK']}-w{nw}-x{_TL_NAME[x_dt]}-o{_TL_NAME[out_dt]}"
                                f"-w{_TL_NAME[w_dt] if w_dt else 'none'}-b{_TL_NAME[b_dt] if b_dt else 'none'}"
                                f"-res{int(has_res)}"
                            )
                            configs.append(
                                {"id": cid, "kernel": kernel, "signature": sig, "constexprs": cexp, "num_warps": nw}
                            )
    return configs


SHIPPED_CONFIGS = shipped_configs()


@functools.lru_cache(maxsize=1024)
def _plan(x_dtype, out_dtype, w_dtype, b_dtype, has_residual: bool, n_cols: int):
    """(kernel, constexprs, num_warps) for a launch, cached: the hot path is per token."""
    kernel, _, constexprs, num_warps = _spec(x_dtype, out_dtype, w_dtype, b_dtype, has_residual, n_cols)
    return kernel, constexprs, num_warps


# ---------------------------------------------------------------------------------------
# Launcher


def layer_norm_fwd(out, x, weight, bias, eps, residual=None, residual_out=None) -> None:
    """out[r, :] = LayerNorm(s[r, :]) with s = x or round_x(x + residual) (-> residual_out).

    x, residual, residual_out: [rows, hidden], inner stride 1, any row stride; residual and
    residual_out have x's dtype (both given or both None). out: [rows, hidden], x's dtype or
    fp32. weight, bias: None or [hidden] contiguous, x's dtype or fp32. In place is fine:
    ``out is x`` and ``residual_out is residual``. The caller validates devices and values.
    """
    check_args("layer_norm_fwd", out, x, {"weight": weight, "bias": bias}, residual, residual_out)
    rows, n_cols = x.shape
    layer_norm_rows(out, out.stride(0), residual_out, stride0(residual_out), x, x.stride(0), residual,
                    stride0(residual), weight, bias, rows, n_cols, eps)  # fmt: skip


def layer_norm_rows(out, out_stride, residual_out, residual_out_stride, x, x_stride, residual, residual_stride,
                    weight, bias, rows, n_cols, eps) -> None:  # fmt: skip
    """layer_norm_fwd without its checks, with ringfuse.ops.native.layer_norm's arguments
    (each tensor by its data, rows ``*_stride`` elements apart), for ringfuse.ops, which has
    checked everything."""
    if rows == 0:
        return
    kernel, constexprs, num_warps = _plan(
        x.dtype,
        out.dtype,
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
        residual is not None,
        n_cols,
    )
    launch(kernel, (rows,),
        *row_args(rows, n_cols, out, out_stride, residual_out, residual_out_stride, x, x_stride, residual,
                  residual_stride),
        x if weight is None else weight,
        x if bias is None else bias,
        n_cols,
        float(eps),
        **constexprs,
        num_warps=num_warps,
    )  # fmt: skip
