"""ops/native.py is the one caller of ringfuse._C: a typed wrapper per entry point, looked up
at call time (CPU graph capture swaps _C's attributes), and nothing else in the package calls
a _C kernel directly."""

import ast
import pathlib

import pytest
import torch

from ringfuse import _C, ops
from ringfuse.ops import native

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "python" / "ringfuse"

# Queries of the build and the CPU path: no pointers, called where they are needed.
QUERIES = {"isa", "set_isa", "build_info"}


def direct_kernel_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of every ``_C.<name>`` (``<name>`` not a query) in source: through a name
    bound to the _C module (``from .. import _C [as X]``, ``import ringfuse._C as X``, or a
    plain ``_C``), as ``ringfuse._C.<name>``, ``getattr(_C, "<name>")`` or
    ``from ringfuse._C import <name>``."""
    tree = ast.parse(source)
    aliases = {"_C"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "_C" or module.endswith("._C"):
                found += [(node.lineno, a.name) for a in node.names if a.name not in QUERIES]
            aliases |= {a.asname for a in node.names if a.name == "_C" and a.asname}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.endswith("._C") and a.asname}

    def is_c(expr) -> bool:
        return (isinstance(expr, ast.Name) and expr.id in aliases) or (
            isinstance(expr, ast.Attribute) and expr.attr == "_C")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_c(node.value) and node.attr not in QUERIES:
            found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and is_c(node.args[0]) and isinstance(node.args[1], ast.Constant)
              and node.args[1].value not in QUERIES):  # fmt: skip
            found.append((node.lineno, node.args[1].value))
    return sorted(found)


def test_the_checker_finds_direct_calls():
    src = """
from .. import _C
from .. import _C as K
import ringfuse._C as R
from ringfuse._C import linear, isa
import ringfuse

def f(x):
    _C.rms_norm(x.data_ptr(), 1)
    K.silu_mul(0)
    R.probe_fma(1, 1)
    ringfuse._C.shm_ring_run(0)
    getattr(_C, "int8_pack_b")(0)
    _C.isa(); _C.set_isa("auto"); _C.build_info(); hasattr(_C, "nccl_ring_run")
    getattr(_C, name)  # generic (cpu_graph's patching): not a named kernel
"""
    assert [name for _, name in direct_kernel_uses(src)] == [
        "linear", "rms_norm", "silu_mul", "probe_fma", "shm_ring_run", "int8_pack_b"]


def test_only_native_calls_c_kernels():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 20
    bad = []
    for path in files:
        rel = path.relative_to(PKG).as_posix()
        if rel == "ops/native.py":
            continue
        bad += [f"{rel}:{line} _C.{name}" for line, name in direct_kernel_uses(path.read_text())]
    assert not bad, "call the ops/native.py wrapper instead of _C directly:\n" + "\n".join(bad)


def test_one_wrapper_per_entry_point():
    entries = {n for n in dir(_C) if not n.startswith("_") and callable(getattr(_C, n))}
    assert {"rms_norm", "linear", "shm_ring_run"} <= entries
    missing = sorted(n for n in entries - QUERIES if not callable(getattr(native, n, None)))
    assert not missing, f"_C entry points without a wrapper in ops/native.py: {missing}"


def test_wrappers_look_c_up_at_each_call(monkeypatch):
    """What cpu_graph's capture relies on: a function swapped on _C is the one a wrapper calls.
    Also the marshalling itself: pointers, dtype code, thread count, activation code."""
    calls = []
    monkeypatch.setattr(_C, "silu_mul", lambda *args: calls.append(args))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = ops.gelu_tanh_mul(x)
    assert calls == [(out.data_ptr(), 8, x.data_ptr(), 16, 3, 8, native.DTYPE_CODE[torch.bfloat16],
                      torch.get_num_threads(), native.GATED_ACTIVATIONS["gelu_tanh_mul"])]  # fmt: skip


def test_rms_norm_wrapper_in_place_marshalling(monkeypatch):
    """The Prepared path's in-place call: out is x, residual_out is residual (same pointers);
    an absent residual and weight are 0."""
    calls = []
    monkeypatch.setattr(_C, "rms_norm", lambda *args: calls.append(args))
    x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.rand(8, dtype=torch.bfloat16)
    native.rms_norm(x, 8, r, 8, x, 8, r, 8, w, 2, 8, 1e-6, True)
    native.rms_norm(r, 8, None, 0, x, 8, None, 0, None, 2, 8, 1e-6, False)
    xp, rp, f32 = x.data_ptr(), r.data_ptr(), native.DTYPE_CODE[torch.float32]
    threads = torch.get_num_threads()
    assert calls == [
        (xp, 8, rp, 8, xp, 8, rp, 8, w.data_ptr(), 2, 8, 1e-6, f32, native.DTYPE_CODE[torch.bfloat16], f32, True,
         threads),
        (rp, 8, 0, 0, xp, 8, 0, 0, 0, 2, 8, 1e-6, f32, f32, f32, False, threads),
    ]  # fmt: skip


@pytest.mark.skipif(not __debug__, reason="python -O strips asserts")
def test_wrapper_asserts_what_the_kernel_cannot_check():
    x = torch.randn(2, 8)
    with pytest.raises(AssertionError):
        native.silu_mul(torch.empty(2, 4, dtype=torch.bfloat16), 4, x, 8, 2, 4, "silu_mul")  # one dtype code for both
