"""Bench of ops.linear (the decode-sized float linear) vs torch's F.linear, cold weights:

    .venv/bin/python -m pytest bench/bench_linear.py
    .venv/bin/ringfuse bench linear [--quick]
"""

from ringfuse.bench import linear


def test_table():
    rows = linear.run(ms=linear.QUICK_MS, configs=linear.QUICK_CONFIGS, rounds=3)
    assert rows and all(r["speedup"] > 0 for r in rows)
