"""``ringfuse serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine
loop, with health probes and Prometheus metrics.

- engine_loop.py: the thread that owns the LLM and the asyncio side's handle on it
- protocol.py: request schemas (OpenAI's fields) and their translation to SamplingParams
- metrics.py: the ``ringfuse:*`` Prometheus metrics
- app.py: the routes, errors in OpenAI's shape, auth, SSE streaming
- server.py: the command: socket, uvicorn, signals
- replicas.py: ``--replicas N``: N servers behind sglang-router, started and stopped as one
- tensor_parallel.py: ``--tp N`` under torchrun: rank 0 serves, the other ranks follow its steps

The web stack is the optional ``serve`` extra; this module imports none of it, so the CLI
can say how to install it when it is missing.
"""

from __future__ import annotations

import importlib.util

# import name -> the distribution that provides it
REQUIRED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}
INSTALL_HINT = "pip install 'ringfuse[serve]'"


def missing_dependencies() -> list[str]:
    """The distributions of the serve extra that cannot be imported here."""
    missing = []
    for module, dist in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or a module blocked in sys.modules
            found = False
        if not found:
            missing.append(dist)
    return missing
