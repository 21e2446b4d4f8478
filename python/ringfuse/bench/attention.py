"""Decode-attention bench vs torch SDPA, measured in the same run.

One new token per sequence over a KV cache of length L (all sequences full), B = 1 and 8,
(Hq, Hkv, D) = (9, 3, 64) (SmolLM2-135M) and (32, 8, 128) (Llama-3-8B). The baseline is
``F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)``. GB/s counts the
K and V bytes the kernel must read once; % is of the copy bandwidth measured in this run.
(Prefill attention lands with the rest of the attention issue.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from . import limits as limits_mod
from .harness import compare, fmt_us, print_table

HEADS = [(9, 3, 64), (32, 8, 128)]
BATCHES = [1, 8]
LENGTHS = [512, 2048, 8192]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(heads=HEADS, batches=BATCHES, lengths=LENGTHS, dtypes=tuple(DTYPES), rounds: int = 5, lim=None):
    lim = lim or limits_mod.measure()
    rows, results = [], []
    for hq, hkv, d in heads:
        for b in batches:
            for length in lengths:
                for dt in dtypes:
                    dtype = DTYPES[dt]
                    g = torch.Generator().manual_seed(0)
                    q = torch.randn(b, hq, d, generator=g).to(dtype)  # [B, Hq, D]
                    k = torch.randn(b, hkv, length, d, generator=g).to(dtype)  # [B, Hkv, L, D]
                    v = torch.randn(b, hkv, length, d, generator=g).to(dtype)
                    lens = torch.full((b,), length, dtype=torch.int32)
                    out = torch.empty_like(q)
                    t = compare(
                        {
                            "torch": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True),
                            "ringfuse": lambda: ops.decode_attention(q, k, v, lens, out=out),
                        },
                        rounds=rounds,
                    )
                    ours, base = t["ringfuse"].median_s, t["torch"].median_s
                    gbs = 2 * k.numel() * k.element_size() / ours / 1e9
                    results.append(dict(heads=[hq, hkv, d], batch=b, length=length, dtype=dt, torch_s=base,
                                        ringfuse_s=ours, speedup=base / ours, gbs=gbs))
                    rows.append([f"{hq}/{hkv}/{d}", f"B={b} L={length}", dt, fmt_us(base), fmt_us(ours),
                                 f"{base / ours:.2f}x", f"{gbs:.1f}", f"{100 * gbs / lim.copy_gbs:.0f}%"])
    print_table(
        f"decode_attention: ringfuse vs torch SDPA, {lim.threads} threads, {lim.isa}",
        ["Hq/Hkv/D", "batch, cache", "dtype", "torch us", "ringfuse us", "speedup", "KV GB/s", "% copy bw"],
        rows,
        note=f"median of interleaved rounds; copy bandwidth measured in this run: {lim.copy_gbs:.1f} GB/s. "
             "The same cache is read every call (L3-resident when it fits).",
    )
    return results
