"""llama.cpp's OpenAI-compatible HTTP server (the ``xllamacpp`` binding) on a GGUF, until
SIGTERM or SIGINT: the peer of ``ringfuse bench serve``.

Run as a script by the Python of the peers venv (``$PEERS_VENV``, which has xllamacpp;
ringfuse is not installed there), never imported by ringfuse::

    python -I llama_server.py MODEL.gguf [--host 127.0.0.1] [--port 0] [--threads 2]
                              [--parallel 16] [--ctx 6144] [--alias NAME]

``--port 0`` takes a free port; the address is printed once the model is loaded, as
``listening on http://HOST:PORT``, the line the bench waits for. ``--ctx`` is the context
of all slots together: llama.cpp splits it across the ``--parallel`` slots.
"""

import argparse
import signal
import sys
import threading
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=16, help="slots: sequences decoded together")
    ap.add_argument("--ctx", type=int, default=6144, help="total context, split across the slots")
    ap.add_argument("--alias", default="model", help="the model id of /v1/models and requests")
    args = ap.parse_args(argv)

    import xllamacpp

    stop = threading.Event()  # handlers first: a SIGTERM during the load still stops us
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    p = xllamacpp.CommonParams()
    p.model.path = args.gguf
    p.hostnames = [args.host]
    p.port = args.port
    p.n_ctx = args.ctx
    p.n_parallel = args.parallel
    p.cont_batching = True  # continuous batching, as ringfuse's engine
    p.cpuparams.n_threads = args.threads
    p.cpuparams_batch.n_threads = args.threads  # prefill too, not only decode
    p.model_alias = {args.alias}
    p.verbosity = -1  # errors only: a log line per request would cost time on 2 cores
    t0 = time.perf_counter()
    server = xllamacpp.Server(p)  # loads the model, then listens
    if stop.is_set():
        return 0
    version = getattr(xllamacpp, "__version__", "?")
    print(f"llama.cpp server (xllamacpp {version}) listening on {server.listening_address} "
          f"(load {time.perf_counter() - t0:.2f} s)", flush=True)  # fmt: skip
    stop.wait()
    del server  # stops the HTTP threads and frees the model
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
