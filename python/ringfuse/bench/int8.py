"""int8 benches vs torch eager, measured in the same run. So far: quantize_per_token vs the
same formula in torch ops (amax, divide, round, clamp, cast), for the activation shapes of
a W8A8 linear layer: M tokens x K in {576, 1536, 4096}. GB/s counts x read once, int8
written once and the scales; % is of the copy bandwidth measured in this run."""

from __future__ import annotations

import torch

from .. import ops
from . import limits as limits_mod
from .harness import compare, fmt_us, print_table

ROWS = [1, 16, 256, 2048]
KS = [576, 1536, 4096]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _torch_quantize(x):
    scale = x.float().abs().amax(-1, keepdim=True) / 127
    q = torch.round(x.float() / scale.clamp(min=1e-30)).clamp(-127, 127).to(torch.int8)
    return q, scale


def run(rows=ROWS, ks=KS, dtypes=tuple(DTYPES), rounds: int = 7, lim=None):
    lim = lim or limits_mod.measure()
    table, results = [], []
    for m in rows:
        for k in ks:
            for dt in dtypes:
                x = torch.randn(m, k).to(DTYPES[dt])  # [M, K] activations
                t = compare({"torch": lambda: _torch_quantize(x), "ringfuse": lambda: ops.quantize_per_token(x)},
                            rounds=rounds)  # fmt: skip
                ours, base = t["ringfuse"].median_s, t["torch"].median_s
                nbytes = x.numel() * (x.element_size() + 1) + m * 4
                gbs = nbytes / ours / 1e9
                results.append(dict(op="quantize_per_token", m=m, k=k, dtype=dt, torch_s=base, ringfuse_s=ours,
                                    speedup=base / ours, gbs=gbs))
                table.append([f"M={m}", f"K={k}", dt, fmt_us(base), fmt_us(ours), f"{base / ours:.2f}x", f"{gbs:.1f}",
                              f"{100 * gbs / lim.copy_gbs:.0f}%"])
    print_table(f"quantize_per_token vs torch eager, {lim.threads} threads, {lim.isa}",
                ["rows", "K", "dtype", "torch us", "ringfuse us", "speedup", "GB/s", "% copy bw"], table,
                note=f"median of interleaved rounds; copy bandwidth measured in this run: {lim.copy_gbs:.1f} GB/s.")
    return results
