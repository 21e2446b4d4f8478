"""Compile a Triton kernel for a real NVIDIA GPU on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via the ptxas bundled with triton)
and needs no driver. Register and spill counts are normally read from the loaded module
(``CompiledKernel.n_regs`` / ``n_spills``, which need a device); here they are read from the
cubin with the bundled ``cuobjdump --dump-resource-usage`` (REG, and LOCAL bytes: Triton's
``n_spills`` is ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4``), falling back to ``ptxas -v``
on the PTX when cuobjdump is missing.

Works under ``TRITON_INTERPRET=1`` too (tests set it before triton is imported): there
every ``@triton.jit`` function, the kernel's and triton.language's own (``tl.sum``,
``tl.cdiv``, the reduction combine functions, ...), is an InterpretedFunction, which the
code generator would call as plain Python; and after an interpreted run triton.language.core
still holds interpreter builtins (see _leaked_patch_original). For the duration of a
compile, JITFunctions rebuilt from the same Python functions and the original builtins are
swapped into triton.language's namespaces (and the interpret knob is turned off), then
everything is put back. Not thread-safe: do not compile while another thread runs an
interpreted kernel.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
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

_JIT_KWARGS = set(inspect.signature(JITFunction.__init__).parameters) - {"self", "fn"}
_rebuilt: dict = {}  # id(InterpretedFunction) -> (InterpretedFunction, JITFunction)


def _as_jit_function(fn) -> JITFunction:
    """The JITFunction for a @triton.jit function, also when it is an InterpretedFunction."""
    if isinstance(fn, JITFunction):
        return fn
    py_fn = getattr(fn, "fn", None)  # InterpretedFunction keeps the Python function in .fn
    if py_fn is None or not callable(py_fn) or not hasattr(fn, "rewrite"):
        raise TypeError(f"compile_for_target: expected a @triton.jit function, got {type(fn).__name__}")
    hit = _rebuilt.get(id(fn))
    if hit is None or hit[0] is not fn:
        kwargs = {k: v for k, v in getattr(fn, "kwargs", {}).items() if k in _JIT_KWARGS}
        hit = _rebuilt[id(fn)] = (fn, JITFunction(py_fn, **kwargs))
    return hit[1]


def _leaked_patch_original(value, name: str, tl):
    """The original behind a patch the interpreter left in triton.language, or None.

    GridExecutor patches triton.language for a run and restores it afterwards, but a
    nested call of a @jit function (tl.sum is one) patches triton.language.core again and
    never restores it (triton 3.7), leaving interpreter builtins behind that the code
    generator cannot use."""
    qualname = getattr(value, "__qualname__", "")
    if qualname == "_patch_attr.<locals>.<lambda>":
        while getattr(value, "__qualname__", "") == "_patch_attr.<locals>.<lambda>":
            value = value.__kwdefaults__["member"]
        return value
    func = value.func if isinstance(value, functools.partial) else value
    qualname = getattr(func, "__qualname__", "")
    if value is print or qualname.startswith(("_patch_lang_core.<locals>", "_patch_reduce_scan.<locals>")):
        # range, static_range, static_print, multiple_of, reduce, ...: triton.language
        # re-exports the same objects, and GridExecutor restored its own bindings
        original = vars(tl).get(name)
        if original is not None and _leaked_patch_original(original, name, tl) is None:
            return original
    return None


@contextlib.contextmanager
def _compilable_namespaces(kernel_globals: dict):
    """Under the interpreter, for the duration of a compile: JITFunctions in place of the
    InterpretedFunctions of triton.language (modules and tl.tensor methods) and of the
    kernel's module, the originals in place of leaked interpreter patches, and the
    interpret knob off. Everything is put back afterwards."""
    if not knobs.runtime.interpret:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    import triton.language as tl

    namespaces = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m is not None]
    namespaces += [tl.core.tensor, tl.core.dtype]
    swapped = []  # (namespace, attribute, value to put back)

    def swap(ns, attr, old, new):
        swapped.append((ns, attr, old))
        if isinstance(ns, dict):
            ns[attr] = new
        else:
            setattr(ns, attr, new)

    try:
        for ns in namespaces:
            for attr, val in list(vars(ns).items()):
                if isinstance(val, InterpretedFunction):
                    swap(ns, attr, val, _as_jit_function(val))
                else:
                    original = _leaked_patch_original(val, attr, tl)
                    if original is not None:
                        swap(ns, attr, val, original)
        for attr, val in list(kernel_globals.items()):
            if isinstance(val, InterpretedFunction):
                swap(kernel_globals, attr, val, _as_jit_function(val))
        with knobs.runtime.scope():
            knobs.runtime.interpret = False
            yield
    finally:
        for ns, attr, val in reversed(swapped):
            if isinstance(ns, dict):
                ns[attr] = val
            else:
                setattr(ns, attr, val)


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
    fn = _as_jit_function(jit_fn)
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
    with _compilable_namespaces(fn.fn.__globals__):
        kernel = triton.compile(src, target=target, options={"num_warps": num_warps})
    cubin = kernel.asm["cubin"]
    ptx = kernel.asm["ptx"]
    name = kernel.metadata.name
    try:
        n_regs, local_bytes = _resource_usage(cubin, name)
    except (FileNotFoundError, subprocess.CalledProcessError):
        n_regs, spill_st, spill_ld = _ptxas_usage(ptx, arch)
        local_bytes = max(spill_st, spill_ld)
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
