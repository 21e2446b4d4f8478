"""Compile a Triton kernel for a real NVIDIA GPU on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via the ptxas bundled with triton)
and needs no driver. Register and spill counts are normally read from the loaded module
(``CompiledKernel.n_regs`` / ``n_spills``, which need a device); here they come from
``ptxas -v`` on the PTX (spill stores / loads) and from the bundled ``cuobjdump
--dump-resource-usage`` on Triton's cubin (REG, LOCAL bytes), taking the worse of the two.

Kernels must be real JITFunctions: under ``TRITON_INTERPRET=1`` (as the tests run) every
``@triton.jit`` function is an interpreter object the code generator cannot use. Run the
compiles in a process without the flag instead:

    python -m ringfuse.kernels.compile_check < jobs.json > results.json

reads a JSON list of jobs ``{"module", "kernel", "signature", "constexprs", "arch",
"num_warps", "attrs"?}`` (``module`` a kernels/ module such as "rms_norm", ``attrs`` a list
of ``[arg index, [[attribute, value], ...]]``) and writes one result dict per job.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction


def _tool(name: str, arch: int = 80) -> str | None:
    """Path of a CUDA tool bundled with triton (ptxas as triton picks it for arch)."""
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        try:
            return nv.get_ptxas(arch).path
        except Exception:
            pass
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.path.exists(path) else None


def _resource_usage(cubin: bytes, kernel_name: str) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread) of kernel_name in cubin."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run(
            [cuobjdump, "--dump-resource-usage", path], check=True, capture_output=True, text=True
        ).stdout
    # "Function <name>:\n REG:26 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:... "
    m = re.search(rf"Function {re.escape(kernel_name)}:\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"compile_for_target: no resource usage for {kernel_name} in:\n{text}")
    return int(m.group(1)), int(m.group(4))


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``."""
    ptxas = _tool("ptxas", arch)
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", src, "-o", src + ".o"],
            check=True, capture_output=True, text=True,
        ).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    n_regs = int(regs.group(1)) if regs else -1
    return (n_regs, int(spills.group(1)), int(spills.group(2))) if spills else (n_regs, 0, 0)


def compile_for_target(
    jit_fn, signature: dict, constexprs: dict, arch: int, num_warps: int, attrs: dict | None = None
) -> dict:
    """Compile ``jit_fn`` for ``sm_<arch>`` (80, 90, ...) without a GPU.

    signature: {arg name: "*fp16" | "i32" | "fp32" | ... | "constexpr"} for every argument;
    constexprs: {name: value} for the "constexpr" ones; attrs: optional
    {(arg index,): [["tt.divisibility", 16]]} as Triton's JIT adds for 16-aligned pointers
    and ints (None: every pointer argument is taken as 16-byte aligned, as torch allocations
    are; no int is assumed divisible).

    Returns {"name", "arch", "num_warps", "n_regs", "n_spills" (4-byte words of local
    memory, Triton's definition), "local_bytes", "shared", "ptx_len", "cubin_len", "ptx"}.
    """
    fn = jit_fn
    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"compile_for_target: expected a @triton.jit JITFunction, got {type(fn).__name__} "
            "(under TRITON_INTERPRET=1 compile in another process: python -m ringfuse.kernels.compile_check)"
        )
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise ValueError(f"compile_for_target: signature lacks arguments {missing}")
    if attrs is None:
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, a in enumerate(fn.arg_names)
            if str(signature[a]).startswith("*")
        }
    src = ASTSource(fn, signature, constexprs, attrs)
    target = GPUTarget("cuda", arch, 32)
    kernel = triton.compile(src, target=target, options={"num_warps": num_warps})
    cubin = kernel.asm["cubin"]
    ptx = kernel.asm["ptx"]
    name = kernel.metadata.name
    # Two readings, the worse one counts: cuobjdump on Triton's own cubin, and ptxas -v on
    # the PTX. They have been seen to disagree (cuobjdump reporting no local memory for a
    # kernel ptxas shows spilling kilobytes), so neither alone is trusted.
    n_regs, spill_st, spill_ld = _ptxas_usage(ptx, arch)
    local_bytes = max(spill_st, spill_ld)
    try:
        cu_regs, cu_local = _resource_usage(cubin, name)
        n_regs, local_bytes = max(n_regs, cu_regs), max(local_bytes, cu_local)
    except (FileNotFoundError, subprocess.CalledProcessError):
        pass
    return {
        "name": name,
        "arch": arch,
        "num_warps": num_warps,
        "n_regs": n_regs,
        "n_spills": local_bytes // 4,
        "local_bytes": local_bytes,
        "shared": kernel.metadata.shared,
        "ptx_len": len(ptx),
        "cubin_len": len(cubin),
        "ptx": ptx,
    }


def run_jobs(jobs: list[dict]) -> list[dict]:
    """Compile each job (see the module docstring); results without the PTX text, plus
    ``targets_arch``: whether the PTX names the requested sm_<arch>."""
    package = __package__ or "kernels"
    results = []
    for job in jobs:
        module = importlib.import_module(f"{package}.{job['module']}")
        attrs = None
        if job.get("attrs") is not None:
            attrs = {(index,): [list(a) for a in values] for index, values in job["attrs"]}
        res = compile_for_target(getattr(module, job["kernel"]), job["signature"], job["constexprs"], job["arch"],
                                 job["num_warps"], attrs)
        ptx = res.pop("ptx")
        res["targets_arch"] = f".target sm_{job['arch']}" in ptx
        results.append(res)
    return results


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_check: unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    json.dump(run_jobs(json.load(sys.stdin)), sys.stdout)
