"""Bench of rotary_embedding vs torch eager:

    .venv/bin/python -m pytest bench/bench_rotary_embedding.py
    .venv/bin/ringfuse bench rotary_embedding
"""

from ringfuse.bench import rotary


def test_table():
    rows = rotary.run()
    assert rows and all(r["speedup"] > 0 for r in rows)
