"""kernels/_launch.py: the Triton kernels' direct launches are the JIT's launches.

The host side of a launch needs no GPU: under a stand-in driver (fake_driver.py) the kernels
compile for sm_90 for real and each launch is recorded instead of run. launch_child.py runs
the launchers that way, in a child process without the interpreter, and compares every launch
of launch() with the one ``kernel[grid]`` makes for the same call."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringfuse.kernels import _launch


@pytest.fixture(scope="module")
def child():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("launch_child.py"))], capture_output=True,
                          text=True, env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_direct_launches_are_the_jits(child):
    """Each case (norms aligned or not, hidden 1, fp32, a residual; quantize; decode's two
    kernels on a 2-D grid; w8a16 split-K on a 3-D grid): its first call goes through the JIT
    (one run per kernel), the next ones through launch() alone, all with the JIT's function,
    grid, stream and arguments; interleaved calls keep their own variants."""
    assert len(child["cases"]) == 10
    for name, case in child["cases"].items():
        assert case["same_launches"], name
        first, *rest = case["jit_runs"]
        assert first >= 1 and rest == [0, 0], (name, case["jit_runs"])
    assert child["interleaved_same_launches"]
    kernels = sum(len(functions) for functions in child["functions"].values())
    assert child["distinct_functions"] == kernels == child["cached_variants"] == 12


def test_launch_hooks_see_every_launch(child):
    """A launch hook (a profiler) takes the JIT's path, which calls it."""
    assert child["hook"] == {"seen": ["_rms_norm_fwd_row_kernel"], "jit_runs": 1, "same_launches": True}
    print(f"host time per call, stand-in launcher: {child['host_us']}")


def test_arg_key_tells_apart_what_the_jit_specializes():
    """Two arguments with one arg_key get one specialization from Triton's own rule, over
    ints at every boundary of its classes, floats, bools, None and tensors of each dtype,
    16-byte aligned or not."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 4096, 4097]
    for edge in (1 << 31, 1 << 63, 1 << 64):
        ints += [edge - 17, edge - 16, edge - 1, -edge, -edge + 16, -edge - 16]
    ints = [i for i in ints if -(1 << 63) <= i < (1 << 64)] + [(1 << 63), (1 << 63) + 16, (1 << 64) - 16]
    tensors = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32):
        buf = torch.empty(64, dtype=dtype)
        tensors += [buf, buf[16:], buf[1:], buf[3:]]
    values = ints + [0.5, 1.0, 1e-6, True, False, None] + tensors
    for a, b in itertools.combinations(values, 2):
        if _launch.arg_key(a) == _launch.arg_key(b):
            spec_a = native_specialize_impl(CUDABackend, a, False, True, True)
            spec_b = native_specialize_impl(CUDABackend, b, False, True, True)
            assert spec_a == spec_b, (a, b)
    with pytest.raises(TypeError, match="no specialization rule"):
        _launch.arg_key(object())


def test_launchers_go_through_launch():
    """No launcher calls ``kernel[grid](...)`` itself (ARCHITECTURE.md): each launch goes
    through _launch.launch, so none pays the JIT's per-call work."""
    import re

    kernels_dir = Path(__file__).resolve().parents[2] / "kernels"
    direct = re.compile(r"\b\w+\[[^\]\n]*\]\(")
    found = [f"{path.name}:{i}: {line.strip()}" for path in sorted(kernels_dir.glob("*.py")) if path.name != "_launch.py"
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if direct.search(line.split("#")[0])]  # fmt: skip
    assert not found, found
    assert len(list(kernels_dir.glob("*.py"))) >= 8
