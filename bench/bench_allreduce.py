"""Ring all-reduce vs gloo, 2 processes (nccl-tests style table):

    .venv/bin/python -m pytest bench/bench_allreduce.py
    .venv/bin/ringfuse bench allreduce --nproc 2
"""

from ringfuse.bench import allreduce


def test_table():
    rows = allreduce.run(nproc=2, sizes=allreduce.QUICK_SIZES, rounds=3)
    assert rows and all(r["speedup"] > 0 for r in rows)
