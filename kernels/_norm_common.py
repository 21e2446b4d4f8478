"""What kernels/rms_norm.py and kernels/layer_norm.py share: the residual-add prologue of
their kernels, the BLOCK buckets, the config choice and the launchers' checks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Row kernel up to this BLOCK (16 fp32 values per thread at 16 warps: 40-104 registers of
# the 128 a 512-thread CTA may use). BLOCK 16384 still compiles without spills (16 warps:
# 128 of 128 registers; 32 warps: 64 of 64) but with no margin left, so wider rows take the
# looped kernel: one extra read of the row, mostly from L2.
MAX_ROW_BLOCK = 8192
# Smallest BLOCK: tiny rows share one compiled variant (masked lanes cost no memory traffic).
MIN_BLOCK = 256
# Chunk of the looped kernels and their warps: 8 values per thread per chunk (one 16-byte
# load for 16-bit dtypes); 512 threads x 4 CTAs per SM keep enough bytes in flight.
LOOP_BLOCK = 4096
LOOP_WARPS = 16

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def load_row_sum(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """s = x or round_x(x + residual) over one chunk of a row, in fp32; with a residual,
    round_x(x + residual) is stored to residual_out (which may be residual: each element is
    read before it is written, by the same thread). Masked lanes are 0."""
    s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        s_x = (s + r).to(x_row.dtype.element_ty)
        tl.store(res_out_row + cols, s_x, mask=mask)
        s = s_x.to(tl.float32)
    return s


@triton.jit
def reload_row_sum(x_row, res_out_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """The looped kernels' second read of s: from residual_out when there is a residual
    (after a CTA barrier, so that pass 1's stores are visible), else from x."""
    if HAS_RESIDUAL:
        s = tl.load(res_out_row + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    return s


def pick(n_cols: int, row_kernel, looped_kernel):
    """(kernel, BLOCK, num_warps) for a row of n_cols elements."""
    block = max(MIN_BLOCK, triton.next_power_of_2(n_cols))
    if block > MAX_ROW_BLOCK:
        return looped_kernel, LOOP_BLOCK, LOOP_WARPS
    # 8 elements per thread up to 4096 (one 16-byte load per thread for 16-bit dtypes),
    # then 16 warps (512 threads) with 16 elements per thread at BLOCK 8192
    return row_kernel, block, min(16, block // 256)


def bucket_sizes():
    """One n_cols per (kernel, BLOCK) the launchers can pick."""
    sizes, block = [], MIN_BLOCK
    while block <= MAX_ROW_BLOCK:
        sizes.append(block)
        block *= 2
    sizes.append(2 * MAX_ROW_BLOCK)  # looped
    return sizes


def row_args(rows, n_cols, out, out_stride, residual_out, residual_out_stride, x, x_stride, residual,
             residual_stride) -> tuple:  # fmt: skip
    """The kernels' (tensor, row stride) arguments in their order: out, x, residual,
    residual_out. With one row every stride is n_cols (never read; it specializes like the
    others, never as a 1); without a residual x stands in for both (unused)."""
    if rows == 1:
        out_stride = x_stride = residual_stride = residual_out_stride = n_cols
    if residual is None:
        residual, residual_stride, residual_out, residual_out_stride = x, x_stride, x, x_stride
    return out, out_stride, x, x_stride, residual, residual_stride, residual_out, residual_out_stride


def stride0(t) -> int:
    """t's row stride (0 for an absent tensor)."""
    return 0 if t is None else t.stride(0)


def check_2d(op: str, name: str, t: torch.Tensor, shape, written: bool) -> None:
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be 2-D {list(shape)}, got {list(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have inner stride 1, got strides {t.stride()}")
    if t.shape[0] > 1 and (t.stride(0) < (t.shape[1] if written else 0)):
        raise ValueError(
            f"{op}: {name} rows must not overlap (row stride >= hidden {t.shape[1]}), got strides {t.stride()}"
        )


def check_args(op: str, out, x, params: dict, residual, residual_out) -> None:
    """The launchers' checks: x and out 2-D with inner stride 1, out x's dtype or fp32, each
    of params (name -> tensor or None) contiguous [hidden] in x's dtype or fp32, residual and
    residual_out given together, x's shape and dtype."""
    if x.dtype not in DTYPES:
        raise ValueError(f"{op}: x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [rows, hidden], got shape {list(x.shape)}")
    check_2d(op, "x", x, x.shape, written=False)
    check_2d(op, "out", out, x.shape, written=True)
    if out.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{op}: out dtype must be {x.dtype} or float32, got {out.dtype}")
    for name, p in params.items():
        if p is not None:
            check_param(op, name, p, x)
    if (residual is None) != (residual_out is None):
        raise ValueError(f"{op}: residual and residual_out must be given together")
    if residual is not None:
        check_2d(op, "residual", residual, x.shape, written=False)
        check_2d(op, "residual_out", residual_out, x.shape, written=True)
        if residual.dtype != x.dtype or residual_out.dtype != x.dtype:
            raise ValueError(
                f"{op}: residual and residual_out must have x's dtype {x.dtype}, "
                f"got {residual.dtype} and {residual_out.dtype}"
            )
    if x.shape[0] > 0 and x.shape[1] == 0:
        raise ValueError(f"{op}: hidden size must be >= 1")


def check_param(op: str, name: str, p: torch.Tensor, x: torch.Tensor) -> None:
    n_cols = x.shape[1]
    if p.dim() != 1 or p.shape[0] != n_cols or (n_cols > 1 and p.stride(0) != 1):
        raise ValueError(f"{op}: {name} must be contiguous [{n_cols}], got {list(p.shape)}")
    if p.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{op}: {name} dtype must be {x.dtype} or float32, got {p.dtype}")
