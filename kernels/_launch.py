"""Launch a @triton.jit kernel without the JIT's per-call work once its variant is compiled.

``kernel[grid](*args, **constexprs, num_warps=nw)`` spends its time in Python: binding the
arguments and specializing each one, building the cache key from the options' text, the
launch-hook metadata, the global-variable check, and only then the compiled kernel's
launcher. With a stand-in driver that launches nothing (tests/kernels/fake_driver.py), the
RMSNorm row kernel's 15 arguments take ~8.0 us a call that way on the dev VM (Zen 5, triton
3.7.1 and 3.6.0) and ~4.8 us through ``launch``; a decode-sized norm runs for a few us on
the GPU, so the host is what a decode step waits on.

``launch`` keeps each compiled kernel under its own key and calls its ``run`` directly. The
key holds what Triton's JIT specializes a variant on (``specialize_impl`` in triton 3.6 and
3.7): each tensor's dtype and whether its address is 16-byte aligned; each int's type (i32,
i64 or u64 by range), whether it is divisible by 16, and whether it is 1 (then a
constexpr); floats, bools and None are never specialized. Plus the keyword arguments
(constexprs, num_warps) and the debug and instrumentation knobs. Two calls with one key are
therefore one JIT variant. The first call of a key goes through ``kernel[grid]``, which
compiles the variant (or finds it in Triton's caches) and returns it. The plain
``kernel[grid]`` call is used instead:
- under the Triton interpreter (the kernel is not a JITFunction);
- while launch hooks are set (``triton.knobs.runtime.launch_enter_hook`` / ``exit_hook``:
  profilers such as proton see every launch), or the kernel has pre-run hooks;
- for an argument of a type without a rule here, or a Triton whose JIT internals differ.
tests/kernels/test_launch.py checks, under the stand-in driver, that every launch is the one
``kernel[grid]`` makes (function, grid, stream, arguments) across the variants.
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

_I32_MIN, _I32_MAX, _I64_MAX = -(1 << 31), (1 << 31) - 1, (1 << 63) - 1

# {key: (CompiledKernel, the constexpr values in the kernel's parameter order)}: an entry
# per variant launched, a few per call site.
_compiled: dict = {}


def arg_key(a):
    """What the JIT specializes ``a`` on (see the module docstring), cheaply: the common
    non-negative i32 int is -1 (== 1, a constexpr) or whether it is divisible by 16."""
    t = type(a)
    if t is int:
        if 0 <= a <= _I32_MAX:
            return -1 if a == 1 else a & 15 == 0
        return a & 15 == 0, _I32_MIN <= a < 0, a <= _I64_MAX  # a negative i32, else an i64 or a u64
    if t is torch.Tensor or isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    if t is float or t is bool or a is None:
        return t
    raise TypeError(f"launch: no specialization rule for a {t.__name__} argument")


def is_aligned(tensors, ints) -> bool:
    """Whether Triton's JIT will see every tensor's pointer and every (non-negative) int as
    a multiple of 16, as arg_key does: one OR over them all, cheap enough per launch."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    for i in ints:
        bits |= i
    return bits & 15 == 0


def _hooked(hook) -> bool:
    """Whether a launch hook knob holds anything to call: an empty HookChain (the default
    in triton 3.6 and 3.7) does not; a function assigned in its place does."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Same as ``kernel[grid](*args, **kwargs)``: positional runtime arguments, then the
    constexprs and launch options (num_warps) by keyword."""
    runtime = knobs.runtime
    if not isinstance(kernel, JITFunction) or _hooked(runtime.launch_enter_hook) \
            or _hooked(runtime.launch_exit_hook) or kernel.pre_run_hooks:  # fmt: skip
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    try:
        specialization = tuple(map(arg_key, args))
    except TypeError:  # an argument type without a rule here: the JIT knows
        kernel[grid](*args, **kwargs)
        return
    # id(kernel): the entry's compiled kernel references the JITFunction, keeping the id its own
    key = (id(kernel), device, specialization, tuple(kwargs.items()), runtime.debug,
           knobs.compilation.instrumentation_mode)  # fmt: skip
    entry = _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is None:  # a JIT cache hook took the launch over
            return
        try:  # the JIT's binder: every parameter, in order (the constexprs after args)
            bound = kernel.device_caches[device][4](*args, **kwargs)[0]
        except (AttributeError, IndexError, KeyError, TypeError):  # another Triton: stay on its path
            return
        _compiled[key] = (compiled, tuple(bound.values())[len(args):])
        return
    compiled, constexprs = entry
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                 driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata,
                 None, None, None, *args, *constexprs)  # fmt: skip


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids: triton.cdiv is a ConstexprFunction, ~3.3 us a
    call from Python (triton 3.6 and 3.7)."""
    return -(a // -b)


def cached_variants() -> int:
    """How many compiled variants launch() holds (tests)."""
    return len(_compiled)


def clear() -> None:
    """Forget the compiled kernels held (tests; Triton's own caches are untouched)."""
    _compiled.clear()
