"""pytest-benchmark benches of layer_norm / add_layer_norm vs torch eager.

    .venv/bin/python -m pytest bench/bench_layer_norm.py            # per-call stats, grouped
    .venv/bin/ringfuse bench layer_norm                             # the interleaved ratio table

Each group holds ringfuse and its torch baseline for one shape and dtype, so the group's
table shows their ratio; test_table prints the same-run interleaved table with % of the
copy bandwidth, like `ringfuse bench layer_norm`.
"""

import pytest

from ringfuse.bench import norms

CASES = [(op, shape, dt) for op in norms.FAMILIES["layer_norm"] for shape in norms.SHAPES for dt in norms.DTYPES]


@pytest.mark.parametrize("impl", ["torch", "ringfuse"])
@pytest.mark.parametrize("op,shape,dtype", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_layer_norm(benchmark, impl, op, shape, dtype):
    case = norms.make_cases(op, shape, dtype, modes=("fresh",))[0]
    benchmark.group = f"{op} {shape[0]}x{shape[1]} {dtype}"
    benchmark(case.ours if impl == "ringfuse" else case.torch)


def test_table():
    rows = norms.run(["layer_norm"])
    assert rows and all(r["speedup"] > 0 for r in rows)
