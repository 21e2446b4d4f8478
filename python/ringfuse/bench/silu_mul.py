"""Gated activations vs torch eager, measured in the same run: silu_mul (F.silu(gate) * up)
and gelu_tanh_mul (F.gelu(gate, approximate="tanh") * up), two passes and a temporary in
torch. Shapes: SmolLM2-135M's MLP (d = 1536) at decode (1 and 8 rows) and prefill (512
rows), and a 7B-class MLP (d = 11008)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from . import limits as limits_mod
from .harness import compare, fmt_us, print_table

CASES = [(1, 1536), (8, 1536), (512, 1536), (512, 11008)]  # rows, d
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


ACTS = {  # op -> torch's expression of it
    "silu_mul": lambda x, d: F.silu(x[:, :d]) * x[:, d:],
    "gelu_tanh_mul": lambda x, d: F.gelu(x[:, :d], approximate="tanh") * x[:, d:],
}


def run(cases=CASES, dtypes=tuple(DTYPES), rounds: int = 7, lim=None, acts=tuple(ACTS)):
    lim = lim or limits_mod.measure()
    rows, results = [], []
    for act in acts:
        ours_fn, torch_fn = getattr(ops, act), ACTS[act]
        for n, d in cases:
            for dt in dtypes:
                x = torch.randn(n, 2 * d).to(DTYPES[dt])
                t = compare({"torch": lambda: torch_fn(x, d), "ringfuse": lambda: ours_fn(x)}, rounds=rounds)
                ours, base = t["ringfuse"].median_s, t["torch"].median_s
                nbytes = 3 * n * d * x.element_size()  # x read once, out written once
                results.append(dict(op=act, rows=n, d=d, dtype=dt, torch_s=base, ringfuse_s=ours, speedup=base / ours))
                rows.append([act, f"{n}x{2 * d}", dt, fmt_us(base), fmt_us(ours), f"{base / ours:.2f}x",
                             f"{nbytes / ours / 1e9:.1f}", f"{100 * nbytes / ours / 1e9 / lim.copy_gbs:.0f}%"])  # fmt: skip
    print_table(f"gated activations vs torch eager (act(gate) * up), {lim.threads} threads, {limits_mod.wide_path()}",
                ["op", "x", "dtype", "torch us", "ringfuse us", "speedup", "GB/s", "% of copy bandwidth"], rows,
                note="GB/s counts x read and the output written once.")
    return results
