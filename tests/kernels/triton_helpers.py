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


def compile_in_child(compile_check_module: str, jobs: list[dict], env: dict | None = None) -> list[dict]:
    """One result dict per job (see kernels/compile_check.py for both formats); env: the
    child's environment (default: this one without TRITON_INTERPRET; the child compiles
    hermetically either way)."""
    if env is None:
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


# Local memory the headroom reading may show. Held to any register limit ptxas fills it and
# spills a few words even with registers to spare (8-48 bytes seen across the attention
# variants, e.g. fp32 D 256 flash at 94 of 112 allowed registers); tiles near the limit
# spill 80 bytes to kilobytes there (the earlier fp32 flash tiles 100-3,600).
HEADROOM_SLACK_BYTES = 64


def compile_problems(res: dict, max_shared: int | None = None, headroom: bool = True) -> list[str]:
    """What is wrong with one compile_check result, [] if nothing: a cubin for the arch, no
    local memory in the real compile (worst of ptxas -v and cuobjdump), registers within
    the file, at most HEADROOM_SLACK_BYTES in the headroom reading (ptxas held to
    budget_regs; unless headroom is False), our ptxas run reproducing Triton's cubin byte
    for byte, shared memory within max_shared. Each problem names the fingerprint to compare
    hosts by."""
    problems = []
    if not (res["targets_arch"] and res["ptx_len"] > 0 and res["cubin_len"] > 0):
        problems.append("no cubin for the arch")
    if res["n_spills"]:
        problems.append(f"{res['local_bytes']} bytes of local memory (spills), {res['n_regs']} registers")
    if not 0 < res["n_regs"] <= max_regs(res["num_warps"]):
        problems.append(f"{res['n_regs']} registers, {max_regs(res['num_warps'])} allowed")
    if headroom and (res["budget_local_bytes"] is None or res["budget_local_bytes"] > HEADROOM_SLACK_BYTES):
        spills = "ptxas failed" if res["budget_local_bytes"] is None else f"{res['budget_local_bytes']} bytes of spills"
        problems.append(f"headroom: {spills} held to {res['budget_regs']} registers")
    if not res["cubin_identical"]:
        problems.append("ptxas -v with Triton's flags wrote another cubin than Triton's")
    if max_shared is not None and res["shared"] > max_shared:
        problems.append(f"{res['shared']} bytes of shared memory, {max_shared} allowed")
    if problems:
        problems.append(f"[ptx sha256 {res['ptx_sha256'][:16]}, triton {res['triton']}, ptxas {res['ptxas']}]")
    return problems


def assert_configs_compile(compile_check_module: str, module: str, configs: list[dict], archs=(80, 90)) -> None:
    """Compile each shipped config (dicts as ``SHIPPED_CONFIGS`` lists them) of kernels/
    ``module`` for every arch: no ``compile_problems``."""
    jobs = [{"module": module, "kernel": cfg["kernel"].__name__, "signature": cfg["signature"],
             "constexprs": cfg["constexprs"], "arch": arch, "num_warps": cfg["num_warps"]}
            for cfg in configs for arch in archs]  # fmt: skip
    failures = []
    for job, res in zip(jobs, compile_in_child(compile_check_module, jobs)):
        if problems := compile_problems(res):
            failures.append(f"{job['kernel']} {job['constexprs']} sm_{job['arch']}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)
