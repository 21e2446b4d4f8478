"""Attention benches vs torch SDPA, measured in the same run.

Prefill: ``ops.attention(q, k, v, causal=True)`` vs ``F.scaled_dot_product_attention(q, k,
v, is_causal=True, enable_gqa=True)``, B = 1, Sq = Sk = S. GFLOP/s counts the causal
half of the score and PV products, 4 * Hq * S * (S + 1) / 2 * D; % is of the FMA peak
measured in this run. Peak extra memory at S = 8192 is measured in a child process (the
growth of its max RSS over the inputs and the output), for both.

Decode: one new token per sequence over a KV cache of length L (all sequences full),
B = 1 and 8. The baseline is ``F.scaled_dot_product_attention(q[:, :, None], k, v,
enable_gqa=True)``. The caches are cold: calls cycle through enough copies (>= 256 MB) that
each call reads its K/V from DRAM, as a decode step of a real model does (its layers' caches
together exceed the L3). GB/s counts the K and V bytes read once; % is of the DRAM copy
read bandwidth measured in this run (`ringfuse bench limits`: a 512 MiB read-only stream).

Shapes: (Hq, Hkv, D) = (9, 3, 64) (SmolLM2-135M) and (32, 8, 128) (Llama-3-8B).

Sliding window (Mistral, Gemma 2): causal prefill where each query sees its last W keys,
``ops.attention(q, k, v, causal=True, window=W)`` vs SDPA with the window as a boolean
mask (torch's way to say it; HF's eager and sdpa paths build the same mask). Shape
(8, 4, 256) (Gemma-2-2B), W = 512. GFLOP/s counts the keys each query sees.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

from .. import ops
from . import limits as limits_mod
from .limits import attention_path
from .harness import compare, fmt_us, print_table

HEADS = [(9, 3, 64), (32, 8, 128)]
BATCHES = [1, 8]
LENGTHS = [512, 2048, 8192]
PREFILL_LENGTHS = [128, 512, 2048]
MEMORY_LENGTH = 8192
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLD_BYTES = 256 << 20  # decode caches cycled per case: well past the L3


def prefill_flops(hq: int, s: int, d: int) -> float:
    return 4.0 * hq * s * (s + 1) / 2 * d


def run_prefill(heads=HEADS, lengths=PREFILL_LENGTHS, dtypes=tuple(DTYPES), rounds: int = 5, lim=None):
    lim = lim or limits_mod.measure()
    rows, results = [], []
    for hq, hkv, d in heads:
        for s in lengths:
            for dt in dtypes:
                dtype = DTYPES[dt]
                g = torch.Generator().manual_seed(0)
                q = torch.randn(1, hq, s, d, generator=g).to(dtype)  # [B, Hq, S, D]
                k = torch.randn(1, hkv, s, d, generator=g).to(dtype)  # [B, Hkv, S, D]
                v = torch.randn(1, hkv, s, d, generator=g).to(dtype)
                out = torch.empty_like(q)
                t = compare(
                    {
                        "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                        "ringfuse": lambda: ops.attention(q, k, v, causal=True, out=out),
                    },
                    rounds=rounds,
                )
                ours, base = t["ringfuse"].median_s, t["torch"].median_s
                gflops = prefill_flops(hq, s, d) / ours / 1e9
                results.append(dict(heads=[hq, hkv, d], length=s, dtype=dt, torch_s=base, ringfuse_s=ours,
                                    speedup=base / ours, gflops=gflops, peak_frac=gflops / lim.fma_gflops))
                rows.append([f"{hq}/{hkv}/{d}", f"S={s}", dt, fmt_us(base), fmt_us(ours), f"{base / ours:.2f}x",
                             f"{gflops:.0f}", f"{100 * gflops / lim.fma_gflops:.0f}%",
                             f"{100 * prefill_flops(hq, s, d) / base / 1e9 / lim.fma_gflops:.0f}%"])
    print_table(
        f"attention (causal prefill, B=1): ringfuse vs torch SDPA, {lim.threads} threads, {lim.isa} "
        f"({attention_path()})",
        ["Hq/Hkv/D", "length", "dtype", "torch us", "ringfuse us", "speedup", "GFLOP/s", "% FMA peak",
         "torch % peak"],
        rows,
        note=f"median of interleaved rounds; FMA peak measured in this run: {lim.fma_gflops:.0f} GFLOP/s.",
    )
    return results


_MEMORY_CHILD = r"""
import json, sys, torch
import torch.nn.functional as F
from ringfuse import ops
impl, dt, hq, hkv, d, s, threads = sys.argv[1:]
hq, hkv, d, s = int(hq), int(hkv), int(d), int(s)
torch.set_num_threads(int(threads))
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
q, k, v = (torch.randn(1, h, s, d).to(dtype) for h in (hq, hkv, hkv))
out = torch.zeros_like(q)
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
before = status_kb("VmRSS")
if impl == "torch":
    out.copy_(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
else:
    ops.attention(q, k, v, causal=True, out=out)
print(json.dumps({"extra_bytes": (status_kb("VmHWM") - before) * 1024}))
"""


def peak_memory(impl: str, dt: str, hq: int, hkv: int, d: int, s: int, threads: int) -> dict:
    """Peak extra memory of one causal prefill call, in a fresh process (Linux): the peak
    RSS (VmHWM, reset through /proc/self/clear_refs once the inputs and a preallocated
    output are resident) minus the RSS at that point."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, impl, dt, str(hq), str(hkv), str(d), str(s),
                           str(threads)], capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(heads=HEADS[:1], length: int = MEMORY_LENGTH, dtypes=tuple(DTYPES), lim=None):
    lim = lim or limits_mod.measure()
    rows, results = [], []
    for hq, hkv, d in heads:
        for dt in dtypes:
            got = {impl: peak_memory(impl, dt, hq, hkv, d, length, lim.threads) for impl in ("torch", "ringfuse")}
            qkv_mb = (hq + 2 * hkv) * length * d * DTYPES[dt].itemsize / 2**20
            scores_mb = hq * length * length * 4 / 2**20
            results.append(dict(heads=[hq, hkv, d], length=length, dtype=dt,
                                torch_extra_bytes=got["torch"]["extra_bytes"],
                                ringfuse_extra_bytes=got["ringfuse"]["extra_bytes"]))  # fmt: skip
            rows.append([f"{hq}/{hkv}/{d}", f"S={length}", dt, f"{qkv_mb:.1f}", f"{scores_mb:,.0f}",
                         f"{got['torch']['extra_bytes'] / 2**20:.1f}", f"{got['ringfuse']['extra_bytes'] / 2**20:.1f}"])
    print_table(
        "attention peak extra memory (one causal prefill call, fresh process, peak RSS growth)",
        ["Hq/Hkv/D", "length", "dtype", "q+k+v MB", "[S,S] fp32 scores MB", "torch extra MB", "ringfuse extra MB"],
        rows,
        note="ringfuse writes into a preallocated out (its extra is the lse and per-thread tile scratch); "
             "torch's extra includes its returned output.",
    )
    return results


def run_decode(heads=HEADS, batches=BATCHES, lengths=LENGTHS, dtypes=tuple(DTYPES), rounds: int = 5, lim=None):
    lim = lim or limits_mod.measure()
    rows, results = [], []
    for hq, hkv, d in heads:
        for b in batches:
            for length in lengths:
                for dt in dtypes:
                    dtype = DTYPES[dt]
                    g = torch.Generator().manual_seed(0)
                    kv_bytes = 2 * b * hkv * length * d * dtype.itemsize
                    copies = max(2, math.ceil(COLD_BYTES / kv_bytes))
                    q = torch.randn(b, hq, d, generator=g).to(dtype)  # [B, Hq, D]
                    caches = [(torch.randn(b, hkv, length, d, generator=g).to(dtype),  # [B, Hkv, L, D]
                               torch.randn(b, hkv, length, d, generator=g).to(dtype)) for _ in range(copies)]
                    lens = torch.full((b,), length, dtype=torch.int32)
                    out = torch.empty_like(q)
                    ring_t, ring_r = itertools.cycle(caches), itertools.cycle(caches)

                    def sdpa():
                        k, v = next(ring_t)
                        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)

                    def ours_fn():
                        k, v = next(ring_r)
                        return ops.decode_attention(q, k, v, lens, out=out)

                    t = compare({"torch": sdpa, "ringfuse": ours_fn}, rounds=rounds)
                    del caches
                    ours, base = t["ringfuse"].median_s, t["torch"].median_s
                    gbs = kv_bytes / ours / 1e9
                    results.append(dict(heads=[hq, hkv, d], batch=b, length=length, dtype=dt, torch_s=base,
                                        ringfuse_s=ours, speedup=base / ours, gbs=gbs, bw_frac=gbs / lim.read_gbs))
                    rows.append([f"{hq}/{hkv}/{d}", f"B={b} L={length}", dt, fmt_us(base), fmt_us(ours),
                                 f"{base / ours:.2f}x", f"{gbs:.1f}", f"{100 * gbs / lim.read_gbs:.0f}%",
                                 f"{100 * kv_bytes / base / 1e9 / lim.read_gbs:.0f}%"])
    print_table(
        f"decode_attention (cold KV cache): ringfuse vs torch SDPA, {lim.threads} threads, {limits_mod.wide_path()}",
        ["Hq/Hkv/D", "batch, cache", "dtype", "torch us", "ringfuse us", "speedup", "KV GB/s", "% DRAM bw",
         "torch % bw"],
        rows,
        note=f"median of interleaved rounds; DRAM read bandwidth measured in this run: {lim.read_gbs:.1f} GB/s.",
    )
    return results


WINDOW_HEADS = [(8, 4, 256)]
WINDOW_LENGTHS = [1024, 4096]
WINDOW = 512


def window_flops(hq: int, s: int, d: int, window: int) -> float:
    keys = sum(min(i + 1, window) for i in range(s))  # keys seen, summed over the queries
    return 4.0 * hq * keys * d


def run_window(heads=WINDOW_HEADS, lengths=WINDOW_LENGTHS, window=WINDOW, dtypes=tuple(DTYPES), rounds: int = 5,
               lim=None):  # fmt: skip
    lim = lim or limits_mod.measure()
    rows, results = [], []
    for hq, hkv, d in heads:
        for s in lengths:
            i = torch.arange(s)
            keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # [S, S]: query i sees key j
            for dt in dtypes:
                dtype = DTYPES[dt]
                g = torch.Generator().manual_seed(0)
                q = torch.randn(1, hq, s, d, generator=g).to(dtype)  # [B, Hq, S, D]
                k = torch.randn(1, hkv, s, d, generator=g).to(dtype)  # [B, Hkv, S, D]
                v = torch.randn(1, hkv, s, d, generator=g).to(dtype)
                out = torch.empty_like(q)
                t = compare(
                    {
                        "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True),
                        "ringfuse": lambda: ops.attention(q, k, v, causal=True, window=window, out=out),
                    },
                    rounds=rounds,
                )
                ours, base = t["ringfuse"].median_s, t["torch"].median_s
                flops = window_flops(hq, s, d, window)
                gflops = flops / ours / 1e9
                results.append(dict(heads=[hq, hkv, d], length=s, window=window, dtype=dt, torch_s=base,
                                    ringfuse_s=ours, speedup=base / ours, gflops=gflops,
                                    peak_frac=gflops / lim.fma_gflops))  # fmt: skip
                rows.append([f"{hq}/{hkv}/{d}", f"S={s} W={window}", dt, fmt_us(base), fmt_us(ours),
                             f"{base / ours:.2f}x", f"{gflops:.0f}", f"{100 * gflops / lim.fma_gflops:.0f}%"])
    print_table(
        f"attention with a sliding window (causal prefill, B=1): ringfuse vs torch SDPA with the window mask, "
        f"{lim.threads} threads, {lim.isa} ({attention_path()})",
        ["Hq/Hkv/D", "length", "dtype", "torch us", "ringfuse us", "speedup", "GFLOP/s", "% FMA peak"],
        rows,
        note=f"median of interleaved rounds; FMA peak measured in this run: {lim.fma_gflops:.0f} GFLOP/s.",
    )
    return results


def run(rounds: int = 5, lim=None, quick: bool = False):
    """Everything `ringfuse bench attention` prints: prefill, peak memory, decode."""
    lim = lim or limits_mod.measure()
    prefill = run_prefill(lengths=PREFILL_LENGTHS[:2] if quick else PREFILL_LENGTHS, rounds=rounds, lim=lim)
    memory = run_memory(length=2048 if quick else MEMORY_LENGTH, lim=lim)
    decode = run_decode(lengths=LENGTHS[:2] if quick else LENGTHS, rounds=rounds, lim=lim)
    window = run_window(lengths=WINDOW_LENGTHS[:1] if quick else WINDOW_LENGTHS, rounds=rounds, lim=lim)
    return {"prefill": prefill, "memory": memory, "decode": decode, "window": window}
