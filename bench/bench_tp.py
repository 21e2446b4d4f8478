"""Tensor parallel (tp = 2 processes) vs tp = 1 (one process, two threads) on a Llama MLP
block and decoder layer:

    .venv/bin/python -m pytest bench/bench_tp.py
    .venv/bin/ringfuse bench tp --nproc 2
"""

from ringfuse.bench import tp


def test_table():
    rows = tp.run(nproc=2, rounds=3, quick=True)
    assert rows and all(r["speedup"] > 0 for r in rows)
