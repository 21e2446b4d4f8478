"""Shared by the Triton compile tests: the tests run under the interpreter, which cannot
compile for a GPU, so every compile happens in one child process without TRITON_INTERPRET
(`python -m ringfuse.kernels.compile_check`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


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
