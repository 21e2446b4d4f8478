"""ringfuse: hand-written kernels for LLM inference (fused norms, ...) behind torch ops
and drop-in modules. See README.md."""

import torch  # noqa: F401  (loads torch's runtime before our extension)

from . import _C, nn, ops  # noqa: F401
from .nn import quantize  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    # ringfuse.LLM without importing the runtime (and its tokenizer stack) on `import ringfuse`
    if name == "LLM":
        from .runtime import LLM

        return LLM
    raise AttributeError(f"module 'ringfuse' has no attribute {name!r}")
