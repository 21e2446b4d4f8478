"""Benches of the int8 ops vs torch eager (quantize_per_token, int8_gemm, int8_weight_only_linear)
and of the Int8Linear modules vs float and torch.ao dynamic quantized Linear:

    .venv/bin/python -m pytest bench/bench_int8_gemm.py
    .venv/bin/ringfuse bench int8
"""

from ringfuse.bench import int8


def test_table():
    rows = int8.run()
    assert rows and all(r["speedup"] > 0 for r in rows)


def test_gemm_table():
    rows = int8.run_gemm()
    assert rows and all(r["speedup"] > 0 for r in rows)


def test_weight_only_table():
    rows = int8.run_weight_only()
    assert rows and all(r["speedup"] > 0 for r in rows)


def test_linear_table():
    rows = int8.run_linear()
    assert rows and all(r["speedup"] > 0 for r in rows)
