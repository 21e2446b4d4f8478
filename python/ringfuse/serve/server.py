"""``ringfuse serve``: bind the socket, start uvicorn, load the model on the engine thread.

The socket is bound first (``--port 0`` picks a free port, printed on stderr) and uvicorn
serves at once, so probes get answers while the model loads: /health 200, /ready 503 until
the model is loaded and warmed up. A model that fails to load stops the server with exit
status 1. SIGINT / SIGTERM shut down gracefully (uvicorn's: open requests get a few seconds,
then the engine loop stops and frees every request's blocks); uvicorn then re-raises the
signal, so a SIGTERM ends the process as terminated by it.

Under torchrun with ``--tp N``, rank 0 does all of the above and the other ranks follow it
(tensor_parallel.py); an engine that dies then stops the server with exit status 1, as its
ranks cannot be brought back in step.
"""

from __future__ import annotations

import asyncio
import socket
import sys

GRACEFUL_SHUTDOWN_S = 5  # open requests get this long to finish when the server is stopped
ERROR_REPLY_S = 2  # then they get a 503 error, which this long is left to send before uvicorn cancels


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). OSError if it cannot be had."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind at once after a restart
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def say_line(line: str) -> None:
    """``line`` on stderr in one write: under torchrun the ranks share it, and print()'s two
    writes (the text, then the newline) could interleave with another rank's."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(args) -> int:
    """Serve until stopped; the exit status (1 when the model failed to load)."""
    from ..runtime import LLM
    from ..runtime.model_files import DEFAULT_MODEL_NAME
    from .app import ServeSettings

    def say(message: str) -> None:
        say_line(f"ringfuse serve: {message}")

    settings = ServeSettings(model_name=args.served_model_name or args.model or DEFAULT_MODEL_NAME,
                             max_waiting=args.max_waiting, api_key=args.api_key,
                             max_body_bytes=args.max_body_bytes)  # fmt: skip

    tp = args.tp or 1

    def make_llm() -> LLM:
        return LLM(args.model, device=args.device, dtype=args.dtype, quant=args.quant, tp=tp, max_batch=args.max_batch,
                   max_model_len=args.max_model_len, kv_cache_tokens=args.kv_cache_tokens, threads=args.threads,
                   weight_cache=args.weight_cache, gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip

    mirror = None
    if tp > 1:
        from . import tensor_parallel

        if tensor_parallel.init(args.tp_timeout)[0] != 0:
            return tensor_parallel.run_follower(make_llm)
        mirror = tensor_parallel.Leader(args.tp_timeout)
    try:
        return _serve(args, settings, make_llm, mirror, say)
    finally:
        if mirror is not None:
            from .. import distributed

            distributed.destroy()


def _uvicorn_server(config, engine):
    """uvicorn's Server, which at shutdown also ends the requests still open after
    GRACEFUL_SHUTDOWN_S with the engine's 503 "the server is shutting down" (a JSON error, or
    an SSE error event and [DONE]). Left to uvicorn, they would be cancelled at its timeout
    with no answer: a plain-text 500, or a stream cut short."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            timer = asyncio.get_running_loop().call_later(GRACEFUL_SHUTDOWN_S, engine.end_requests)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server(config)


def _serve(args, settings, make_llm, mirror, say) -> int:
    import uvicorn

    from .app import create_app

    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        say(f"error: cannot listen on {args.host}:{args.port}: {e}")
        return 2
    status = {"code": 0}
    server: uvicorn.Server
    over = f" (tensor-parallel over {args.tp} ranks)" if mirror is not None else ""

    def on_ready() -> None:
        say(f"ready: serving '{settings.model_name}' on {url_of(sock)}{over}")

    def on_dead(message: str, while_loading: bool) -> None:
        say(f"error: {message}")
        # nothing to serve, or tensor-parallel ranks out of step: stop, and say so in the exit status
        if while_loading or mirror is not None:
            status["code"] = 1
            server.should_exit = True

    app = create_app(make_llm, settings, on_ready=on_ready, on_dead=on_dead, mirror=mirror)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S + ERROR_REPLY_S, lifespan="on")  # fmt: skip
    server = _uvicorn_server(config, app.state.engine)
    say(f"listening on {url_of(sock)}; loading the model (GET /ready says 200 once it can serve)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
        say("stopped")
        return 130 if status["code"] == 0 else status["code"]
    finally:
        sock.close()
    return status["code"]
