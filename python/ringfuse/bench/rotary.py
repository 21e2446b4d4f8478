"""rotary_embedding bench vs torch eager (HF's rotate-half formula: gather cos/sin by
position, q * cos + rotate_half(q) * sin, out of place), measured in the same run."""

from __future__ import annotations

import torch

from .. import ops
from . import limits as limits_mod
from .harness import compare, fmt_us, print_table

CASES = [(1, 9, 3, 64), (1, 32, 8, 128), (512, 9, 3, 64), (512, 32, 8, 128)]  # tokens, Hq, Hkv, D
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _torch_rope(q, k, positions, cache):
    half = cache.shape[1] // 2
    cos = torch.cat([cache[positions, :half]] * 2, -1)[:, None, :].to(q.dtype)  # [T, 1, D]
    sin = torch.cat([cache[positions, half:]] * 2, -1)[:, None, :].to(q.dtype)

    def rotate_half(x):
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def run(cases=CASES, dtypes=tuple(DTYPES), rounds: int = 7, lim=None):
    lim = lim or limits_mod.measure()
    rows, results = [], []
    for tokens, hq, hkv, d in cases:
        cache = ops.cos_sin_cache(4096, d, base=1e5)
        positions = torch.arange(tokens) + 7
        for dt in dtypes:
            q = torch.randn(tokens, hq, d).to(DTYPES[dt])
            k = torch.randn(tokens, hkv, d).to(DTYPES[dt])
            t = compare({"torch": lambda: _torch_rope(q, k, positions, cache),
                         "ringfuse": lambda: ops.rotary_embedding(q, k, positions, cache)}, rounds=rounds)
            ours, base = t["ringfuse"].median_s, t["torch"].median_s
            nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
            results.append(dict(tokens=tokens, heads=[hq, hkv, d], dtype=dt, torch_s=base, ringfuse_s=ours,
                                speedup=base / ours))
            rows.append([f"T={tokens}", f"{hq}/{hkv}/{d}", dt, fmt_us(base), fmt_us(ours), f"{base / ours:.2f}x",
                         f"{nbytes / ours / 1e9:.1f}"])
    print_table(f"rotary_embedding (in place) vs torch eager, {lim.threads} threads, {lim.isa}",
                ["tokens", "Hq/Hkv/D", "dtype", "torch us", "ringfuse us", "speedup", "GB/s"], rows,
                note="GB/s counts q and k read and written once.")
    return results
