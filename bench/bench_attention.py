"""pytest-benchmark benches of attention (prefill) and decode attention vs torch SDPA.

    .venv/bin/python -m pytest bench/bench_attention.py            # per-call stats, grouped
    .venv/bin/ringfuse bench attention                             # the interleaved ratio tables
"""

import pytest
import torch
import torch.nn.functional as F

from ringfuse import ops
from ringfuse.bench import attention

PREFILL = [(h, s, dt) for h in attention.HEADS for s in attention.PREFILL_LENGTHS for dt in attention.DTYPES]
DECODE = [(h, b, n, dt) for h in attention.HEADS for b in attention.BATCHES for n in attention.LENGTHS
          for dt in attention.DTYPES]  # fmt: skip


@pytest.mark.parametrize("impl", ["torch", "ringfuse"])
@pytest.mark.parametrize("heads,length,dtype", PREFILL, ids=str)
def test_prefill(benchmark, impl, heads, length, dtype):
    hq, hkv, d = heads
    dt = attention.DTYPES[dtype]
    q, k, v = (torch.randn(1, h, length, d).to(dt) for h in (hq, hkv, hkv))
    benchmark.group = f"prefill {hq}/{hkv}/{d} S={length} {dtype}"
    if impl == "torch":
        benchmark(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    else:
        benchmark(lambda: ops.attention(q, k, v, causal=True))


@pytest.mark.parametrize("impl", ["torch", "ringfuse"])
@pytest.mark.parametrize("heads,batch,length,dtype", DECODE, ids=str)
def test_decode_attention(benchmark, impl, heads, batch, length, dtype):
    """Hot cache (the same K/V every call); the table below cycles cold caches."""
    hq, hkv, d = heads
    dt = attention.DTYPES[dtype]
    q = torch.randn(batch, hq, d).to(dt)
    k, v = torch.randn(batch, hkv, length, d).to(dt), torch.randn(batch, hkv, length, d).to(dt)
    lens = torch.full((batch,), length, dtype=torch.int32)
    benchmark.group = f"decode {hq}/{hkv}/{d} B={batch} L={length} {dtype}"
    if impl == "torch":
        benchmark(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
    else:
        benchmark(lambda: ops.decode_attention(q, k, v, lens))


def test_table():
    res = attention.run()
    assert all(r["speedup"] > 0 for part in ("prefill", "decode") for r in res[part])
    assert all(r["ringfuse_extra_bytes"] >= 0 for r in res["memory"])
