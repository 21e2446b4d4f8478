"""Run in a child process without TRITON_INTERPRET (test_launch.py): the kernels' launchers
under the stand-in driver (fake_driver.py), comparing what kernels/_launch.py launches with
what the plain ``kernel[grid]`` call launches. Prints one JSON object."""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_driver  # noqa: E402

fake_driver.install()

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ringfuse.kernels import _launch  # noqa: E402
from ringfuse.kernels import attention as triton_attention  # noqa: E402
from ringfuse.kernels import int8_gemm as triton_int8  # noqa: E402
from ringfuse.kernels import rms_norm as triton_rms_norm  # noqa: E402

JIT_RUNS = [0]
_run = JITFunction.run


def _counting_run(self, *args, **kwargs):
    JIT_RUNS[0] += 1
    return _run(self, *args, **kwargs)


JITFunction.run = _counting_run


def calls(fn):
    """(launches recorded, JIT runs) of one call of fn (a case). Tensors the launcher
    allocates for itself (split-K workspaces) are new each call: their addresses read
    "scratch"."""
    start, runs = len(fake_driver.LAUNCHES), JIT_RUNS[0]
    fn()
    own = {t.data_ptr() for t in fn.tensors}
    launches = [
        (*launch[:4], tuple(a if not (type(a) is tuple and a[0] == "tensor" and a[1] not in own)
                            else ("tensor", "scratch", *a[2:]) for a in launch[4]))
        for launch in fake_driver.LAUNCHES[start:]
    ]  # fmt: skip
    return launches, JIT_RUNS[0] - runs


def case(fn, *tensors):
    """fn, a call of a launcher, with the tensors it passes (the others are scratch)."""
    fn.tensors = tensors
    return fn


def plain(fn):
    """What kernel[grid] launches for fn: launch() holds nothing before or after, so the
    call takes the JIT's path."""
    _launch.clear()
    try:
        return calls(fn)[0]
    finally:
        _launch.clear()


def rms_case(rows, hidden, dtype=torch.bfloat16, x_offset=0, residual=False):
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    buf = torch.randn(rows * hidden + x_offset, generator=g).to(dtype)
    x = buf[x_offset:].view(rows, hidden)
    w = torch.rand(hidden, generator=g).to(dtype)
    out = torch.empty_like(x)
    r = torch.randn(rows, hidden, generator=g).to(dtype) if residual else None
    r_out = torch.empty_like(x) if residual else None
    return case(lambda: triton_rms_norm.rms_norm_fwd(out, x, w, 1e-6, residual=r, residual_out=r_out),
                *[t for t in (out, x, w, r, r_out) if t is not None])


def quantize_case(rows, k, x_offset=0):
    buf = torch.randn(rows * k + x_offset)
    x = buf[x_offset:].view(rows, k)
    q, scale = torch.empty(rows, k, dtype=torch.int8), torch.empty(rows)
    return case(lambda: triton_int8.quantize_per_token_fwd(q, scale, x), q, scale, x)


def decode_case(batch, hq, hkv, s_max, d, num_splits):
    g = torch.Generator().manual_seed(batch + s_max)
    q = torch.randn(batch, hq, d, generator=g).to(torch.bfloat16)
    k = torch.randn(batch, hkv, s_max, d, generator=g).to(torch.bfloat16)
    v = torch.randn(batch, hkv, s_max, d, generator=g).to(torch.bfloat16)
    seq_lens = torch.full((batch,), s_max, dtype=torch.int32)
    out = torch.empty_like(q)
    return case(lambda: triton_attention.decode_attention_fwd(out, q, k, v, seq_lens, d**-0.5, num_splits=num_splits),
                out, q, k, v, seq_lens)


def weight_only_case(m, k, n, split_k):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(n, generator=g) / 100, torch.randn(n, generator=g)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    return case(lambda: triton_int8.weight_only_fwd(out, x, w_q, scale, bias, None, split_k=split_k),
                out, x, w_q, scale, bias)


def main():
    result = {}
    # Variants the JIT tells apart: aligned, x off by one element (not 16-byte aligned),
    # hidden 1 (ints == 1 become constexprs), another dtype, a residual; quantize aligned
    # and not. Each case: the JIT path once, then launch() three times.
    cases = {
        "rms aligned": rms_case(4, 4096),
        "rms x unaligned": rms_case(4, 4096, x_offset=1),
        "rms hidden 1": rms_case(1, 1),
        "rms fp32": rms_case(4, 4096, dtype=torch.float32),
        "rms residual": rms_case(3, 576, residual=True),
        "quantize aligned": quantize_case(5, 1024),
        "quantize unaligned": quantize_case(5, 1000, x_offset=3),
        "decode 2-D grid, two kernels": decode_case(2, 8, 2, 256, 64, 4),
        "w8a16 3-D grid, split-K": weight_only_case(1, 512, 256, 4),
        "w8a16 M 1, one split": weight_only_case(1, 512, 256, 1),
    }
    expected = {name: plain(fn) for name, fn in cases.items()}
    report = {}
    for name, fn in cases.items():
        rounds = [calls(fn) for _ in range(3)]
        report[name] = {
            "same_launches": all(launches == expected[name] for launches, _ in rounds),
            "jit_runs": [runs for _, runs in rounds],
        }
    # the cached variants again, interleaved: each call still gets its own variant
    again = all(calls(fn)[0] == expected[name] for name, fn in reversed(cases.items()))
    functions = {name: [launch[3] for launch in expected[name]] for name in cases}
    result["cases"] = report
    result["interleaved_same_launches"] = again
    result["distinct_functions"] = len({f for fs in functions.values() for f in fs})
    result["functions"] = functions
    result["cached_variants"] = _launch.cached_variants()

    # with a launch hook (a profiler): every launch goes through the JIT and is seen
    seen = []
    knobs.runtime.launch_enter_hook = lambda metadata: seen.append(metadata.get()["name"])
    try:
        launches, runs = calls(cases["rms aligned"])
    finally:
        knobs.runtime.launch_enter_hook = None
    result["hook"] = {"seen": seen, "jit_runs": runs, "same_launches": launches == expected["rms aligned"]}

    # host time per call of the row kernel: kernel[grid] against launch(), with a launcher
    # that does nothing
    x = torch.randn(1, 4096).to(torch.bfloat16)
    w, out = torch.rand(4096).to(torch.bfloat16), torch.empty_like(x)
    kernel, cexp, nw = triton_rms_norm._plan(x.dtype, out.dtype, w.dtype, False, False, 4096)
    args = (out, 4096, x, 4096, x, 4096, x, 4096, w, 4096, 1e-6)
    JITFunction.run = _run
    fake_driver.RECORD = False
    timing = {}
    for label, fn in (("jit", lambda: kernel[(1,)](*args, **cexp, num_warps=nw)),
                      ("launch", lambda: _launch.launch(kernel, (1,), *args, **cexp, num_warps=nw))):  # fmt: skip
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(2000):
                fn()
            best = min(best, (time.perf_counter() - t0) / 2000 * 1e6)
        timing[label] = round(best, 2)
    result["host_us"] = timing
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
