"""ringfuse: hand-written kernels for LLM inference (fused norms, ...) behind torch ops
and drop-in modules. See README.md."""

import torch  # noqa: F401  (loads torch's runtime before our extension)

import os as _os

from . import _C, nn, ops  # noqa: F401
from .nn import quantize  # noqa: F401

# RINGFUSE_ISA=amx | avx512vnni | avx2 | scalar | auto picks the CPU kernels' path for a whole
# process (and its children, e.g. the bench's engines): what _C.set_isa does for one.
if _os.environ.get("RINGFUSE_ISA"):
    try:
        _C.set_isa(_os.environ["RINGFUSE_ISA"])
    except ValueError as _e:
        raise ValueError(f"RINGFUSE_ISA: {_e}") from None

__version__ = "0.1.0"


def __getattr__(name):
    # ringfuse.LLM without importing the runtime (and its tokenizer stack) on `import ringfuse`
    if name == "LLM":
        from .runtime import LLM

        return LLM
    raise AttributeError(f"module 'ringfuse' has no attribute {name!r}")
