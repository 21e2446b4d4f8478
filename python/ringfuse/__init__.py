"""ringfuse: hand-written kernels for LLM inference (fused norms, ...) behind torch ops
and drop-in modules. See README.md."""

import os as _os
import sys as _sys


def _invoked_as_command(argv: list[str]) -> bool:
    """Whether this process is the `ringfuse` command or `python -m ringfuse` (its real
    command line: spawned children inherit sys.argv, not sys.orig_argv)."""
    args = argv[1:]
    if "-m" in args:
        return args[args.index("-m") + 1 : args.index("-m") + 2] == ["ringfuse"]
    script = next((a for a in args if not a.startswith("-")), "")
    return _os.path.basename(script) == "ringfuse"


def _interrupted(*_):
    print("ringfuse: interrupted", file=_sys.stderr, flush=True)
    _os._exit(130)


# As the command: a Ctrl-C while torch loads (a second or so) or a bad RINGFUSE_ISA ends it
# with one line and the command's exit status, not a traceback; cli.main takes SIGINT over.
# A SIGINT the parent ignores (a background job, nohup) stays ignored.
_AS_COMMAND = _invoked_as_command(getattr(_sys, "orig_argv", _sys.argv))
if _AS_COMMAND:
    import signal as _signal

    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
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

__version__ = "0.1.0"


def __getattr__(name):
    # ringfuse.LLM without importing the runtime (and its tokenizer stack) on `import ringfuse`
    if name == "LLM":
        from .runtime import LLM

        return LLM
    raise AttributeError(f"module 'ringfuse' has no attribute {name!r}")
