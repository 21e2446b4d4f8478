"""Compile a Triton kernel for a real NVIDIA GPU on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via the ptxas bundled with triton)
and needs no driver. Register and spill counts are normally read from the loaded module
(``CompiledKernel.n_regs`` / ``n_spills``, which need a device); here two readings are
taken and the worse counts (``n_regs``, ``local_bytes``):

- ``ptxas -v`` on Triton's PTX with Triton's own ptxas command line (the cubin it writes is
  compared with Triton's: ``cubin_identical``), counting stack frame, spill stores and spill
  loads of every function;
- the bundled ``cuobjdump --dump-resource-usage`` on Triton's cubin (REG, STACK, LOCAL;
  spills live in STACK, LOCAL stays 0 for them).

A third reading measures headroom (``budget_local_bytes``): ``ptxas -v`` on the same PTX
held to ``budget_regs(num_warps)`` registers (``.maxnreg``, 7/8 of what the CTA may use).
Given any register limit ptxas allocates differently (it fills the limit, then spills): the
fp32 flash tile (32, 32, 4) at D 128 needed 196 registers and no local memory unlimited, but
spilled 100-116 bytes with any .maxnreg from 150 to 255. A config that spills more than a
few words there is one ptxas heuristic away from spilling; the compile tests allow
HEADROOM_SLACK_BYTES (tests/kernels/triton_helpers.py).

Same verdict on every host: each compile runs hermetically (``hermetic()``): the variables
that change what Triton, LLVM or ptxas produce (TRITON_*, MLIR_*, LLVM_*, NVPTX_*,
DISABLE_*, PTXAS_OPTIONS: a TRITON_PTXAS_PATH to another CUDA's ptxas, PTXAS_OPTIONS,
TRITON_KERNEL_OVERRIDE, TRITON_DEFAULT_FP_FUSION, DISABLE_LLVM_OPT, ...) are unset for its
duration, programmatic knob overrides are reset, and the Triton cache is a fresh private
directory (never ~/.triton/cache, which another host, another ptxas or an override may
have filled). The tools are the ones bundled with triton. Each result carries the
fingerprint needed to compare two hosts: ``ptx_sha256``, ``triton``, ``ptxas``.
Measured: the pipeline is host-independent: the same PTX hashes from a Python
run under QEMU with an AVX2-only EPYC-Rome CPU as natively on AVX-512, and ptxas writes
byte-identical cubins for it under EPYC-Rome, Nehalem, qemu64 and with glibc's AVX2 / FMA
paths masked.

Kernels must be real JITFunctions: under ``TRITON_INTERPRET=1`` (as the tests run) every
``@triton.jit`` function is an interpreter object the code generator cannot use. Run the
compiles in a process without the flag instead:

    python -m ringfuse.kernels.compile_check < jobs.json > results.json

reads a JSON list of jobs ``{"module", "kernel", "signature", "constexprs", "arch",
"num_warps", "attrs"?}`` (``module`` a kernels/ module such as "rms_norm", ``attrs`` a list
of ``[arg index, [[attribute, value], ...]]``) and writes one result dict per job.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# Environment variables that change Triton's / LLVM's / ptxas's output, or where Triton
# reads cached or overridden IR from; unset while compiling (hermetic()).
_ENV_PREFIXES = ("TRITON_", "MLIR_", "LLVM_", "NVPTX_", "DISABLE_")
_ENV_NAMES = ("PTXAS_OPTIONS", "USE_IR_LOC")
# Triton's ptxas command line (triton 3.7 backends/nvidia/compiler.py make_cubin, default
# knobs): ptxas -lineinfo -v --regAllocOptLevel=2 --gpu-name=sm_XX in.ptx -o out.cubin
_TRITON_PTXAS_FLAGS = ("-lineinfo", "-v", "--regAllocOptLevel=2")


def budget_regs(num_warps: int) -> int:
    """Registers per thread the headroom reading allows: 7/8 of what a CTA of num_warps
    warps may use (64K-register file, 255 cap), in ptxas' allocation unit of 8."""
    cap = min(255, 65536 // (32 * num_warps))
    return cap * 7 // 8 // 8 * 8


@contextlib.contextmanager
def hermetic():
    """Compile as on a fresh host: codegen-affecting variables unset, Triton's knobs at
    their defaults, a private empty cache directory. Restores everything afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES}
    with contextlib.ExitStack() as stack:
        for k in saved:
            del os.environ[k]
        stack.callback(os.environ.update, saved)  # registered first: runs last
        for group in (knobs.cache, knobs.compilation, knobs.language, knobs.nvidia, knobs.runtime):
            stack.enter_context(group.scope())
            group.reset()
        knobs.cache.dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ringfuse-compile-check-"))
        yield


def _tool(name: str, arch: int = 80) -> str | None:
    """Path of a CUDA tool bundled with triton (ptxas as triton picks it for arch; call
    under hermetic(), where TRITON_PTXAS_PATH cannot point elsewhere)."""
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        try:
            return nv.get_ptxas(arch).path
        except Exception:
            pass
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.path.exists(path) else None


def _tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+), (V\S+)", out)
    return m.group(2) if m else "?"


def _resource_usage(cubin: bytes, kernel_name: str) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread: max of STACK, where spills
    live, and LOCAL) of kernel_name in cubin."""
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
    return int(m.group(1)), max(int(m.group(2)), int(m.group(4)))


def _with_maxnreg(ptx: str, regs: int) -> str:
    """The PTX with a ``.maxnreg`` directive on its entry (Triton always emits .reqntid)."""
    out, n = re.subn(r"^(\.reqntid [^\n]*)$", rf"\1\n.maxnreg {regs}", ptx, count=1, flags=re.M)
    if n != 1:
        raise RuntimeError("compile_for_target: no .reqntid directive in the PTX")
    return out


def _ptxas_usage(ptx: str, arch: int, maxnreg: int | None = None) -> tuple[int, int, bytes]:
    """(registers, local bytes: the largest stack frame / spill stores / spill loads of
    any function, cubin) from ``ptxas -v`` with Triton's flags."""
    ptxas = _tool("ptxas", arch)
    suffix = "a" if arch >= 90 else ""
    if maxnreg is not None:
        ptx = _with_maxnreg(ptx, maxnreg)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [ptxas, *_TRITON_PTXAS_FLAGS, f"--gpu-name=sm_{arch}{suffix}", src, "-o", src + ".o"],
            check=True, capture_output=True, text=True,
        ).stderr  # fmt: skip
        with open(src + ".o", "rb") as f:
            cubin = f.read()
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    local = [int(b) for m in re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                        log) for b in m]  # fmt: skip
    if not regs:
        raise RuntimeError(f"compile_for_target: no register count in ptxas -v output:\n{log}")
    return max(regs), max(local, default=0), cubin


def compile_for_target(
    jit_fn, signature: dict, constexprs: dict, arch: int, num_warps: int, attrs: dict | None = None,
    num_stages: int | None = None,
) -> dict:
    """Compile ``jit_fn`` for ``sm_<arch>`` (80, 90, ...) without a GPU, hermetically.

    signature: {arg name: "*fp16" | "i32" | "fp32" | ... | "constexpr"} for every argument;
    constexprs: {name: value} for the "constexpr" ones; attrs: optional
    {(arg index,): [["tt.divisibility", 16]]} as Triton's JIT adds for 16-aligned pointers
    and ints (None: every pointer argument is taken as 16-byte aligned, as torch allocations
    are; no int is assumed divisible); num_stages: None for Triton's default (3), as a
    launch without num_stages gets.

    Returns {"name", "arch", "num_warps", "n_regs", "n_spills" (4-byte words of local
    memory, Triton's definition, rounded up), "local_bytes", "budget_regs",
    "budget_local_bytes" (None: ptxas cannot compile it within budget_regs),
    "cubin_identical", "shared", "ptx_len", "cubin_len", "ptx_sha256", "triton", "ptxas",
    "ptx"} (the readings: module docstring).
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
    # Options spelled out rather than taken from knobs read at import (PTXAS_OPTIONS).
    options = {"num_warps": num_warps, "ptx_options": "", "enable_fp_fusion": True, "debug": False}
    if num_stages is not None:
        options["num_stages"] = num_stages
    with hermetic():
        kernel = triton.compile(src, target=target, options=options)
        cubin = kernel.asm["cubin"]
        ptx = kernel.asm["ptx"]
        name = kernel.metadata.name
        ptxas = _tool("ptxas", arch)
        # Three readings, the worst counts. ptxas -v and cuobjdump have been seen to disagree
        # (cuobjdump's LOCAL stays 0 for spills, which it reports as STACK).
        n_regs, local_bytes, our_cubin = _ptxas_usage(ptx, arch)
        try:
            cu_regs, cu_local = _resource_usage(cubin, name)
            n_regs, local_bytes = max(n_regs, cu_regs), max(local_bytes, cu_local)
        except (FileNotFoundError, subprocess.CalledProcessError):
            pass
        budget = budget_regs(num_warps)
        try:
            _, budget_local, _ = _ptxas_usage(ptx, arch, maxnreg=budget)
        except subprocess.CalledProcessError:  # e.g. wgmma operands need more registers
            budget_local = None
        ptxas_id = f"{_tool_version(ptxas)} {ptxas}"
    return {
        "name": name,
        "arch": arch,
        "num_warps": num_warps,
        "n_regs": n_regs,
        "n_spills": local_bytes // 4 + (local_bytes % 4 > 0),
        "local_bytes": local_bytes,
        "budget_regs": budget,
        "budget_local_bytes": budget_local,
        "cubin_identical": our_cubin == cubin,
        "shared": kernel.metadata.shared,
        "ptx_len": len(ptx),
        "cubin_len": len(cubin),
        "ptx_sha256": hashlib.sha256(ptx.encode()).hexdigest(),
        "triton": triton.__version__,
        "ptxas": ptxas_id,
        "ptx": ptx,
    }


# fp32 PTX instructions that are not correctly rounded: Triton's `/` on fp32 is div.full.f32
# (up to 2 ulp off), tl.exp2 is ex2.approx. A kernel that must give the CPU's bits uses
# tl.div_rn / tl.sqrt_rn instead; run_jobs lists what each PTX holds.
APPROX_OPS = re.compile(r"\b((?:div\.full|div\.approx|rcp\.approx|sqrt\.approx|rsqrt\.approx|ex2\.approx|lg2\.approx)"
                        r"(?:\.ftz)?\.f32)")


def run_jobs(jobs: list[dict]) -> list[dict]:
    """Compile each job (see the module docstring); results without the PTX text, plus
    ``targets_arch``: whether the PTX names the requested sm_<arch>, and ``approx_ops``: the
    approximate fp32 instructions in it (APPROX_OPS)."""
    package = __package__ or "ringfuse.kernels"
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
        res["approx_ops"] = sorted(set(APPROX_OPS.findall(ptx)))
        results.append(res)
    return results


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_check: unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    json.dump(run_jobs(json.load(sys.stdin)), sys.stdout)
