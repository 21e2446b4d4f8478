"""Benches of the int8 ops vs torch eager (so far quantize_per_token):

    .venv/bin/python -m pytest bench/bench_int8_gemm.py
    .venv/bin/ringfuse bench int8
"""

from ringfuse.bench import int8


def test_table():
    rows = int8.run()
    assert rows and all(r["speedup"] > 0 for r in rows)
