"""Shared by the Triton kernel tests.

- ``interp_only``: CPU tensors only run under the interpreter; with TRITON_INTERPRET=0 (a
  GPU run of the suite) such tests skip and the gpu-marked tests cover the compiled kernels.
- Compiles: the tests run under the interpreter, which cannot compile for a GPU, so every
  compile happens in one child process without TRITON_INTERPRET
  (`python -m ringfuse.kernels.compile_check`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

interp_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (TRITON_INTERPRET=1)"
)


def compile_in_child(compile_check_module: str, jobs: list[dict]) -> list[dict]:
    """One result dict per job (see kernels/compile_check.py for both formats)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", compile_check_module], input=json.dumps(jobs), capture_output=True,
                          text=True, env=env, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    assert len(results) == len(jobs)
    return results


def max_regs(num_warps: int) -> int:
    """Registers per thread a CTA of num_warps warps may use (64K-register file, 255 cap)."""
    return min(255, 65536 // (32 * num_warps))


def assert_configs_compile(compile_check_module: str, module: str, configs: list[dict], archs=(80, 90)) -> None:
    """Compile each shipped config (dicts as ``SHIPPED_CONFIGS`` lists them) of kernels/
    ``module`` for every arch: a cubin for that arch, no spills, registers within the file."""
    jobs = [{"module": module, "kernel": cfg["kernel"].__name__, "signature": cfg["signature"],
             "constexprs": cfg["constexprs"], "arch": arch, "num_warps": cfg["num_warps"]}
            for cfg in configs for arch in archs]  # fmt: skip
    for job, res in zip(jobs, compile_in_child(compile_check_module, jobs)):
        assert res["targets_arch"] and res["cubin_len"] > 0, (job["constexprs"], job["arch"])
        assert res["n_spills"] == 0, (job["constexprs"], job["arch"], res)
        assert 0 < res["n_regs"] <= max_regs(job["num_warps"]), (job["constexprs"], job["arch"], res["n_regs"])
