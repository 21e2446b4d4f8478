"""Bench of silu_mul vs torch eager:

    .venv/bin/python -m pytest bench/bench_silu_mul.py
    .venv/bin/ringfuse bench silu_mul
"""

from ringfuse.bench import silu_mul


def test_table():
    rows = silu_mul.run()
    assert rows and all(r["speedup"] > 0 for r in rows)
