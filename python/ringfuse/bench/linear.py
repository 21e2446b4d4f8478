"""ops.linear vs torch's F.linear at decode sizes (run) and prefill sizes (run_prefill),
measured in the same run.

Shapes: the fused linears of SmolLM2-135M as the runtime runs them (qkv [960, 576],
o [576, 576], gate_up [3072, 576], down [576, 1536], lm_head [49152, 576]) for M rows of x.
Configurations:
- fp32: x and W fp32, vs F.linear in fp32 (MKL sgemv / sgemm);
- bf16: x and W bf16, vs F.linear in bf16;
- bf16W/fp32x (full run only): ops.linear reads bf16 weights with fp32 activations, vs
  fp32 F.linear on the fp32 weights it replaces.
Weights are cold, as in decode (a model's weights stream from DRAM once per token): each
call takes the next of enough copies to pass 256 MiB. GB/s counts the weight bytes read
once per call (N K sizeof(W)); % is of the DRAM read bandwidth measured in this run.

run_prefill: M > 16 rows (a prompt), where ops.linear runs its packed-panel GEMM, fp32 x
and W against fp32 F.linear (MKL sgemm); compute-bound, so GFLOP/s (2 M N K / time) and %
of the fp32 FMA peak measured in this run; weights warm (one copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from . import limits as limits_mod
from .harness import compare, fmt_us, print_table

# (name, N, K): the runtime's fused layers of SmolLM2-135M
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]
MS = [1, 2, 4, 8]
QUICK_MS = [1, 8]
# name: (x dtype, W dtype, baseline x / W dtype)
CONFIGS = {
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "bf16W/fp32x": (torch.float32, torch.bfloat16, torch.float32),
}
QUICK_CONFIGS = ("fp32", "bf16")
# prefill: the runtime's layers and a Llama-7B-sized square one, at prompt lengths
PREFILL_SHAPES = SHAPES[:4] + [("4096^2", 4096, 4096)]
PREFILL_MS = [17, 33, 128, 512]
QUICK_PREFILL_MS = [33, 128]
POOL_BYTES = 256 << 20


def _pool(w: torch.Tensor) -> list[torch.Tensor]:
    """Copies of w cycled call by call so that every call reads its weights from DRAM."""
    copies = max(2, -(-POOL_BYTES // (w.numel() * w.element_size())))
    return [w] + [w.clone() for _ in range(copies - 1)]


def run(shapes=SHAPES, ms=MS, configs=tuple(CONFIGS), rounds: int = 7, lim=None):
    lim = lim or limits_mod.measure()
    table, results = [], []
    for name, n, k in shapes:
        w32 = torch.randn(n, k) / k**0.5  # [N, K]
        pools = {torch.float32: _pool(w32)}
        if any(CONFIGS[c][1] == torch.bfloat16 for c in configs):
            pools[torch.bfloat16] = _pool(w32.bfloat16())
        for m in ms:
            for cfg in configs:
                x_dt, w_dt, base_dt = CONFIGS[cfg]
                x = torch.randn(m, k).to(x_dt)  # [M, K]
                xb = x.to(base_dt)
                ours_pool, base_pool = pools[w_dt], pools[base_dt]
                it = {"ours": 0, "base": 0}

                def nxt(key, pool):
                    it[key] = (it[key] + 1) % len(pool)
                    return pool[it[key]]

                t = compare({"torch": lambda: F.linear(xb, nxt("base", base_pool)),
                             "ringfuse": lambda: ops.linear(x, nxt("ours", ours_pool))}, rounds=rounds)  # fmt: skip
                ours, base = t["ringfuse"].median_s, t["torch"].median_s
                wbytes = n * k * ours_pool[0].element_size()
                gbs, base_gbs = wbytes / ours / 1e9, n * k * base_pool[0].element_size() / base / 1e9
                results.append(dict(op="linear", layer=name, m=m, n=n, k=k, config=cfg, torch_s=base,
                                    ringfuse_s=ours, speedup=base / ours, gbs=gbs, torch_gbs=base_gbs,
                                    bw_frac=gbs / lim.read_gbs))  # fmt: skip
                table.append([name, f"N={n} K={k}", f"M={m}", cfg, fmt_us(base), fmt_us(ours), f"{base / ours:.2f}x",
                              f"{base_gbs:.1f}", f"{gbs:.1f}", f"{100 * gbs / lim.read_gbs:.0f}%"])  # fmt: skip
        del pools
    print_table(f"linear vs F.linear, cold weights, {lim.threads} threads, {limits_mod.wide_path()}",
                ["layer", "N, K", "M", "dtypes", "torch us", "ringfuse us", "speedup", "torch GB/s", "GB/s",
                 "% DRAM read"], table, left=4,
                note=f"GB/s: weight bytes per call / time; DRAM read bandwidth measured in this run: "
                     f"{lim.read_gbs:.1f} GB/s (copy: {lim.copy_gbs:.1f} GB/s). Median of interleaved rounds.")  # fmt: skip
    return results


def run_prefill(shapes=PREFILL_SHAPES, ms=PREFILL_MS, rounds: int = 7, lim=None):
    lim = lim or limits_mod.measure()
    table, results = [], []
    for name, n, k in shapes:
        w = torch.randn(n, k) / k**0.5  # [N, K]
        for m in ms:
            x = torch.randn(m, k)  # [M, K]
            t = compare({"torch": lambda: F.linear(x, w), "ringfuse": lambda: ops.linear(x, w)}, rounds=rounds)
            ours, base = t["ringfuse"].median_s, t["torch"].median_s
            flops = 2.0 * m * n * k
            gflops, base_gflops = flops / ours / 1e9, flops / base / 1e9
            results.append(dict(op="linear_prefill", layer=name, m=m, n=n, k=k, config="fp32", torch_s=base,
                                ringfuse_s=ours, speedup=base / ours, gflops=gflops, torch_gflops=base_gflops,
                                peak_frac=gflops / lim.fma_gflops))  # fmt: skip
            table.append([name, f"N={n} K={k}", f"M={m}", fmt_us(base), fmt_us(ours), f"{base / ours:.2f}x",
                          f"{base_gflops:.0f}", f"{gflops:.0f}", f"{100 * gflops / lim.fma_gflops:.0f}%"])  # fmt: skip
    print_table(f"linear at prefill sizes (ringfuse's GEMM past 16 rows) vs F.linear, fp32, warm weights, "
                f"{lim.threads} threads, {limits_mod.wide_path()}",
                ["layer", "N, K", "M", "torch us", "ringfuse us", "speedup", "torch GFLOP/s", "GFLOP/s", "% FMA peak"],
                table, left=3,
                note=f"fp32 FMA peak measured in this run: {lim.fma_gflops:.0f} GFLOP/s. Median of interleaved rounds.")
    return results
