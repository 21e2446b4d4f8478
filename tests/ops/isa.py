"""Running test code at a chosen CPU ISA level (``_C.set_isa``), "auto" restored after."""

import contextlib

from ringfuse import _C


@contextlib.contextmanager
def isa_level(name: str):
    _C.set_isa(name)
    try:
        yield name
    finally:
        _C.set_isa("auto")


def at_avx2_and_avx512(fn) -> tuple:
    """(fn() at "avx2", fn() at "avx512vnni"): the two levels whose bits must agree."""
    with isa_level("avx2"):
        narrow = fn()
    with isa_level("avx512vnni"):
        return narrow, fn()
