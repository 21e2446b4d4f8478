"""pytest-benchmark benches of decode attention vs torch SDPA.

    .venv/bin/python -m pytest bench/bench_attention.py            # per-call stats, grouped
    .venv/bin/ringfuse bench attention                             # the interleaved ratio table
"""

import pytest
import torch
import torch.nn.functional as F

from ringfuse import ops
from ringfuse.bench import attention

CASES = [(h, b, n, dt) for h in attention.HEADS for b in attention.BATCHES for n in attention.LENGTHS
         for dt in attention.DTYPES]


@pytest.mark.parametrize("impl", ["torch", "ringfuse"])
@pytest.mark.parametrize("heads,batch,length,dtype", CASES, ids=str)
def test_decode_attention(benchmark, impl, heads, batch, length, dtype):
    hq, hkv, d = heads
    dt = attention.DTYPES[dtype]
    q, k, v = torch.randn(batch, hq, d).to(dt), torch.randn(batch, hkv, length, d).to(dt), torch.randn(
        batch, hkv, length, d).to(dt)
    lens = torch.full((batch,), length, dtype=torch.int32)
    benchmark.group = f"decode {hq}/{hkv}/{d} B={batch} L={length} {dtype}"
    if impl == "torch":
        benchmark(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
    else:
        benchmark(lambda: ops.decode_attention(q, k, v, lens))


def test_table():
    rows = attention.run()
    assert rows and all(r["speedup"] > 0 for r in rows)
