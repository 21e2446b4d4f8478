"""Benches of the fused norms vs torch eager, measured in the same run.

Baselines: F.rms_norm; ``x + r`` then F.rms_norm; F.layer_norm; ``x + r`` then F.layer_norm.
Each case reports the median time per call of both, the speedup, the bytes the fused kernel
must move (inputs read once, outputs written once) as GB/s and as a % of the copy
bandwidth measured at the start of the run. "fresh" calls allocate their outputs as torch
does (at [4096, 4096] each new 64 MiB output costs tens of ms of page faults); "out=" calls
write into preallocated tensors and show the kernel alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops
from . import limits as limits_mod
from .harness import compare, fmt_us, print_table

SHAPES = [(1, 576), (64, 576), (2048, 576), (4096, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")
FAMILIES = {"rms_norm": ("rms_norm", "add_rms_norm"), "layer_norm": ("layer_norm", "add_layer_norm")}


@dataclass
class Case:
    op: str
    shape: tuple[int, int]
    dtype: str
    mode: str  # "fresh" or "out="
    ours: Callable[[], object]
    torch: Callable[[], object]
    bytes_moved: int


def make_cases(op: str, shape, dtype_name: str, modes=("fresh", "out=")) -> list[Case]:
    """The ringfuse call and its torch baseline for one (op, shape, dtype), per mode."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)  # [rows, hidden]
    r = torch.randn(shape, generator=g).to(dtype)  # [rows, hidden]
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)  # [hidden]
    b = (torch.randn(shape[-1], generator=g) * 0.1).to(dtype)  # [hidden]
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    hidden = (shape[-1],)
    calls = {
        "rms_norm": (lambda: ops.rms_norm(x, w), lambda: ops.rms_norm(x, w, out=out),
                     lambda: F.rms_norm(x, hidden, w, 1e-6)),
        "add_rms_norm": (lambda: ops.add_rms_norm(x, r, w),
                         lambda: ops.add_rms_norm(x, r, w, out=out, residual_out=res_out),
                         lambda: F.rms_norm(x + r, hidden, w, 1e-6)),
        "layer_norm": (lambda: ops.layer_norm(x, w, b), lambda: ops.layer_norm(x, w, b, out=out),
                       lambda: F.layer_norm(x, hidden, w, b)),
        "add_layer_norm": (lambda: ops.add_layer_norm(x, r, w, b),
                           lambda: ops.add_layer_norm(x, r, w, b, out=out, residual_out=res_out),
                           lambda: F.layer_norm(x + r, hidden, w, b)),
    }
    fresh, into, base = calls[op]
    # bytes the fused kernel must move: read x (and r), write out (and x + r)
    tensors = 4 if op.startswith("add_") else 2
    nbytes = tensors * x.numel() * x.element_size()
    return [Case(op, tuple(shape), dtype_name, m, fresh if m == "fresh" else into, base, nbytes) for m in modes]


def modes_for(shape) -> tuple[str, ...]:
    # Large fresh outputs are dominated by the allocator (glibc returns freed multi-MiB
    # buffers to the OS, so each call page-faults them in again): out= shows the kernel.
    return ("fresh", "out=") if shape[0] * shape[1] >= 1 << 20 else ("fresh",)


def run(names=("rms_norm",), shapes=SHAPES, dtypes=tuple(DTYPES), rounds: int = 7, lim=None):
    """Print one table per op family; returns the rows as dicts (for tests and JSON)."""
    ops_to_run = [op for name in names for op in FAMILIES.get(name, (name,))]
    for op in ops_to_run:
        if op not in OPS:
            raise ValueError(f"unknown norm bench {op!r}; expected one of {OPS + tuple(FAMILIES)}")
    lim = lim or limits_mod.measure()
    results = []
    for op in ops_to_run:
        rows = []
        for shape in shapes:
            for dt in dtypes:
                for case in make_cases(op, shape, dt, modes_for(shape)):
                    # few rounds for the big shapes: each call there takes tens of ms
                    n_rounds = rounds if shape[0] * shape[1] < 4096 * 4096 else max(3, rounds // 2)
                    t = compare({"torch": case.torch, "ringfuse": case.ours}, rounds=n_rounds)
                    ours, base = t["ringfuse"].median_s, t["torch"].median_s
                    gbs = case.bytes_moved / ours / 1e9
                    results.append(dict(op=op, shape=list(shape), dtype=dt, mode=case.mode, torch_s=base,
                                        ringfuse_s=ours, speedup=base / ours, gbs=gbs,
                                        pct_copy=100 * gbs / lim.copy_gbs))
                    rows.append([f"{shape[0]}x{shape[1]}", dt, case.mode, fmt_us(base), fmt_us(ours),
                                 f"{base / ours:.2f}x", f"{gbs:.1f}", f"{100 * gbs / lim.copy_gbs:.0f}%"])
        baseline = {"rms_norm": "F.rms_norm", "add_rms_norm": "x + r; F.rms_norm",
                    "layer_norm": "F.layer_norm", "add_layer_norm": "x + r; F.layer_norm"}[op]
        print_table(
            f"{op}: ringfuse vs torch eager ({baseline}), {lim.threads} threads, {lim.isa}",
            ["shape", "dtype", "output", "torch us", "ringfuse us", "speedup", "GB/s", "% copy bw"],
            rows,
            note=f"median of interleaved rounds; copy bandwidth measured in this run: {lim.copy_gbs:.1f} GB/s "
                 f"(read + write). GB/s counts the bytes the fused op must move.",
        )
    return results
