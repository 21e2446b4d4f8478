"""RINGFUSE_ISA and `ringfuse bench --isa`: a CPU kernel path forced for a whole process
(and the benches' child processes), or a clear error."""

import os
import subprocess
import sys

import pytest


def _run(code, env_isa):
    env = {**os.environ, "RINGFUSE_ISA": env_isa}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_env_forces_the_path(isa):
    from ringfuse import _C

    if isa == "avx2" and not _C.build_info()["cpu_has_avx2"]:
        pytest.skip("no AVX2 on this CPU")
    proc = _run("import ringfuse; from ringfuse.bench.limits import cpu_path; print(cpu_path())", isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == isa


def test_env_bad_value_names_the_variable():
    proc = _run("import ringfuse", "sse9")
    assert proc.returncode != 0 and "RINGFUSE_ISA" in proc.stderr and "'auto', 'amx', 'avx512vnni', 'avx2' or 'scalar'" in proc.stderr


def test_bench_flag_refuses_unknown_paths():
    proc = subprocess.run([sys.executable, "-m", "ringfuse", "bench", "limits", "--isa", "sse9"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--isa" in proc.stderr
