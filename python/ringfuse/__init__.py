"""ringfuse: hand-written kernels for LLM inference (fused norms, ...) behind torch ops
and drop-in modules. See README.md."""

import os as _os
import sys as _sys

# Imported by the `ringfuse` command (or `python -m ringfuse`, whose argv[0] is "-m" while
# the package loads): a Ctrl-C while torch loads (a second or so) or a bad RINGFUSE_ISA ends
# it with one line and the command's exit status, not a traceback.
_AS_COMMAND = bool(_sys.argv) and (_sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]) == "ringfuse")
if _AS_COMMAND:
    import signal as _signal

    def _interrupted(*_):
        print("ringfuse: interrupted", file=_sys.stderr, flush=True)
        _os._exit(130)

    _signal.signal(_signal.SIGINT, _interrupted)

import torch  # noqa: E402, F401  (loads torch's runtime before our extension)

from . import _C, nn, ops  # noqa: E402, F401
from .nn import quantize  # noqa: E402, F401

# RINGFUSE_ISA=amx | avx512vnni | avx2 | scalar | auto picks the CPU kernels' path for a whole
# process (and its children, e.g. the bench's engines): what _C.set_isa does for one.
if _os.environ.get("RINGFUSE_ISA"):
    try:
        _C.set_isa(_os.environ["RINGFUSE_ISA"])
    except ValueError as _e:
        if _AS_COMMAND:
            print(f"ringfuse: error: RINGFUSE_ISA: {_e}", file=_sys.stderr)
            raise SystemExit(2) from None
        raise ValueError(f"RINGFUSE_ISA: {_e}") from None
if _AS_COMMAND:
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)  # the command handles Ctrl-C from here on

__version__ = "0.1.0"


def __getattr__(name):
    # ringfuse.LLM without importing the runtime (and its tokenizer stack) on `import ringfuse`
    if name == "LLM":
        from .runtime import LLM

        return LLM
    raise AttributeError(f"module 'ringfuse' has no attribute {name!r}")
