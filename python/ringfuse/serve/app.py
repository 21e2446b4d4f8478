"""The FastAPI app: OpenAI-compatible routes over one EngineLoop, probes and metrics.

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE streaming), GET
/v1/models, POST /tokenize, POST /detokenize (these need the API key when one is set);
GET /health (liveness), GET /ready (readiness), GET /metrics (Prometheus) are open, for
probes and scrapers; so are the routes a balancer in front of several servers reads (the
names sglang-router uses): GET /model_info and /server_info (also as /get_model_info and
/get_server_info) and GET /get_load.

Bodies are read and parsed here rather than by FastAPI's typed parameters, so that every
refusal has OpenAI's error shape and the right status: 413 for a body over the limit (before
reading it, when Content-Length says so), 400 for malformed JSON or bad fields, 404 for
another model, 401 without the key, 429 when the waiting queue is full, 503 while the model
loads or after the engine died, and 500 with a generic message (the traceback goes to the
server's log, never to the client).

A client that goes away (mid-stream, or while a non-streaming request runs) aborts its
sequences, which frees their KV-cache blocks; the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..runtime.engine import LLM, GenerationResult, TokenEvent
from ..runtime.sampling import TokenLogprobs
from . import protocol
from .engine_loop import (DEAD, DISCONNECTED, READY, EngineLoop, EngineUnavailable, Failure, Mirror, QueueFull,
                          RequestHandle)
from .metrics import ServerMetrics

log = logging.getLogger("ringfuse.serve")

LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a probability that underflowed is reported as this (as vLLM)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    model_name: str  # the name clients pass as "model" (GET /v1/models lists it)
    max_waiting: int = 64  # sequences waiting for admission before new requests get 429
    api_key: str | None = None  # Bearer key for the API routes (None: open)
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    retry_after_s: int = 1  # Retry-After of a 429 / 503

    def __post_init__(self):
        for name in ("max_waiting", "max_body_bytes", "retry_after_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty str, got {self.model_name!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty str or None")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()):
            # header values arrive as Latin-1 and clients send ASCII: such a key could never match
            raise ValueError("api_key must be printable ASCII")


class APIError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return _json(self.body(), self.status, self.headers)


def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status, headers, media_type="application/json")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(make_llm: Callable[[], LLM], settings: ServeSettings, on_ready: Callable[[], None] | None = None,
               on_dead: Callable[[str, bool], None] | None = None, mirror: Mirror | None = None) -> FastAPI:  # fmt: skip
    """The app; its lifespan starts the engine loop (``make_llm`` runs on the engine
    thread) and stops it. ``on_ready()``, ``on_dead(message, while_loading)``, ``mirror``:
    see EngineLoop."""
    engine = EngineLoop(make_llm, max_waiting=settings.max_waiting, on_ready=on_ready, on_dead=on_dead,
                        mirror=mirror)  # fmt: skip
    engine.observer = metrics = ServerMetrics(settings.model_name, engine)  # its gauges read the engine loop
    token_texts: dict[int, tuple[str, bytes]] = {}  # token id -> its text and bytes, for logprobs
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="ringfuse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings

    # ---- errors -------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(protocol.ParamError)
    async def param_error(request: Request, e: protocol.ParamError):
        return APIError(400, str(e), param=e.param, code=e.code).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # unknown route, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        detail = e.detail if isinstance(e.detail, str) else "error"
        message = f"{detail}: {request.method} {request.url.path}"
        return APIError(e.status_code, message, code=code, headers=dict(e.headers or {})).response()

    app.add_middleware(_InternalErrors)

    # ---- helpers ------------------------------------------------------------------------

    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def off_loop(fn, *args):
        """fn(*args) in a worker thread: parsing, the chat template and tokenizing a multi-MB
        body took seconds on the event loop, stalling every stream and /health (the
        tokenizer releases the GIL). A thread hop costs tens of us per request."""
        return await asyncio.to_thread(fn, *args)

    async def read_json(request: Request) -> dict:
        limit = settings.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:  # refused before reading a byte of it
            raise _too_large(int(length), limit)
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # no (or a false) Content-Length: stop reading at the limit
                raise _too_large(size, limit, at_least=True)
            body.append(chunk)
        try:
            obj = await off_loop(json.loads, b"".join(body))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise APIError(400, f"the body must be a JSON object, got {protocol._JSON_TYPES.get(type(obj), 'value')}",
                           code="invalid_json")  # fmt: skip
        return obj

    def serving_llm() -> LLM:
        try:
            engine.check_serving()
        except EngineUnavailable as e:
            raise APIError(503, str(e), "service_unavailable", code="engine_unavailable",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None  # fmt: skip
        return engine.llm

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{settings.model_name}' "
                           "(GET /v1/models)", param="model", code="model_not_found")  # fmt: skip

    async def parsed_request(request: Request, model: type):
        """(the engine, the parsed body) of an API request, its refusals in this order: the body
        (413, 400 bad JSON), the engine (503), the fields (400), the model name (404)."""
        body = await read_json(request)
        llm = serving_llm()
        req = await off_loop(protocol.parse, model, body)
        check_model(req.model)
        return llm, req

    def check_queue() -> None:
        if engine.num_waiting >= engine.max_waiting:
            raise _queue_full(f"{engine.num_waiting} requests are waiting (--max-waiting {engine.max_waiting})")

    def submit(job: protocol.Job) -> RequestHandle:
        try:
            return engine.submit(job.sequences())
        except QueueFull as e:
            raise _queue_full(str(e)) from None
        except EngineUnavailable:
            serving_llm()  # raises the 503
            raise

    def _queue_full(why: str) -> APIError:
        return APIError(429, f"the server is busy: {why}; retry later or elsewhere", "rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(settings.retry_after_s)})  # fmt: skip

    async def events(handle: RequestHandle, request: Request) -> AsyncIterator[tuple[int, TokenEvent]]:
        """The handle's (position, event) pairs until all its sequences finish. A client
        that goes away aborts them at once (from the watcher, even while this generator is
        not being consumed); so does leaving this generator early, for any reason."""

        async def watch_disconnect():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.abort(handle)
            handle.queue.put_nowait(DISCONNECTED)

        watcher = asyncio.create_task(watch_disconnect())
        pending = len(handle.sequences)
        try:
            while pending:
                item = await handle.queue.get()
                if item is DISCONNECTED:
                    return
                if isinstance(item, Failure):
                    kind = "invalid_request_error" if item.status == 400 else "server_error"
                    raise APIError(item.status, item.message, kind)
                pos, ev = item
                pending -= ev.finished
                yield pos, ev
        finally:
            watcher.cancel()
            engine.abort(handle)  # no-op for finished sequences

    def token_text(token_id: int) -> tuple[str, bytes]:
        """A token's text and bytes for logprobs. A piece of a multi-byte character decodes
        alone to U+FFFD: it is named by its bytes, "bytes:\\xf0\\x9f", as vLLM does, so that
        such tokens stay apart (top_logprobs are keyed by this text)."""
        entry = token_texts.get(token_id)
        if entry is None:
            tok = engine.llm.tokenizer
            text = tok.decode([token_id])
            if "\ufffd" in text:
                raw = tok.token_bytes(token_id)
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            else:
                raw = text.encode()
            entry = token_texts[token_id] = (text, raw)
        return entry

    def usage(job: protocol.Job, results: list[GenerationResult]) -> dict:
        firsts = results[:: job.n]  # the prompt counts once per prompt, not once per choice
        prompt = sum(len(r.prompt_token_ids) for r in firsts)
        completion = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in firsts)}}  # fmt: skip

    def text_offsets(token_ids: list[int]) -> list[int]:
        """Where each token's text starts in the completion's text (a piece of a character
        starts where the character does)."""
        decoder, offsets, offset = engine.llm.tokenizer.decoder(), [], 0
        for t in token_ids:
            offsets.append(offset)
            offset += len(decoder.push(t))
        return offsets

    def completion_logprobs(token_ids: list[int], lps: list[TokenLogprobs], offsets: list[int]) -> dict:
        def top(t: int, lp: TokenLogprobs) -> dict:  # the k likeliest and the sampled token (OpenAI: up to k + 1)
            out = {token_text(a)[0]: _finite(v) for a, v in lp.top}
            out.setdefault(token_text(t)[0], _finite(lp.logprob))
            return out

        return {"tokens": [token_text(t)[0] for t in token_ids], "token_logprobs": [_finite(lp.logprob) for lp in lps],
                "top_logprobs": [top(t, lp) for t, lp in zip(token_ids, lps)], "text_offset": offsets}

    def chat_logprobs(token_ids: list[int], lps: list[TokenLogprobs]) -> dict:
        def entry(t: int, v: float) -> dict:
            text, raw = token_text(t)
            return {"token": text, "logprob": _finite(v), "bytes": list(raw)}

        return {"content": [dict(entry(t, lp.logprob), top_logprobs=[entry(a, v) for a, v in lp.top])
                            for t, lp in zip(token_ids, lps)]}  # fmt: skip

    # ---- probes and metrics (open) ----------------------------------------------------------

    @app.get("/health")
    async def health():
        """Liveness: 200 while the process can serve or is loading; 503 once the engine died."""
        if engine.state == DEAD:
            return _json({"status": "dead", "message": engine.error}, 503)
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready():
        """Readiness: 200 once the model is loaded and warmed up; 503 before, after a death
        and while shutting down (a balancer sends nothing then)."""
        if engine.state == READY:
            return _json({"status": "ready", "model": settings.model_name})
        message = {"loading": "the model is loading"}.get(engine.state, engine.error or engine.state)
        return _json({"status": engine.state, "message": message}, 503,
                     {"Retry-After": str(settings.retry_after_s)})  # fmt: skip

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- what a balancer reads (open, as the probes; sglang-router's names) --------------------

    def model_info() -> dict:
        """The served name (a balancer lists it in its /v1/models) and, when the model's
        folder has one, the local tokenizer. Nothing else: a model_path that is not a local
        tokenizer folder makes sglang-router try to download one from the Hub."""
        info = {"served_model_name": settings.model_name, "is_generation": True}
        tokenizer = _local_tokenizer_dir(engine.llm.path) if engine.llm is not None else None
        if tokenizer is not None:
            info["model_path"] = info["tokenizer_path"] = tokenizer
        return info

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def get_model_info():
        return _json(model_info())

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def get_server_info():
        info = dict(model_info(), status=engine.state, version=_version(), tp_size=1, dp_size=1,
                    max_waiting=settings.max_waiting)  # fmt: skip
        llm = engine.llm
        if llm is not None:
            info.update(tp_size=llm.tp, max_model_len=llm.max_model_len, max_running_requests=llm.max_batch,
                        max_total_num_tokens=llm.kv.num_blocks * llm.block_size)  # fmt: skip
        return _json(info)

    @app.get("/get_load")
    async def get_load():
        """sglang's load report (one data-parallel rank): sequences running and waiting, and
        the tokens they hold in the KV cache (what power-of-two routing compares)."""
        return _json([{"dp_rank": 0, "num_reqs": engine.num_running, "num_waiting_reqs": engine.num_waiting,
                       "num_tokens": engine.stats.kv_tokens}])  # fmt: skip

    # ---- the API ------------------------------------------------------------------------

    api = [Depends(authorize)]

    @app.get("/v1/models", dependencies=api)
    async def models():
        llm = serving_llm()
        return _json({"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": created, "owned_by": "ringfuse",
            "root": str(llm.path), "max_model_len": llm.max_model_len}]})  # fmt: skip

    @app.post("/tokenize", dependencies=api)
    async def tokenize(request: Request):
        llm, req = await parsed_request(request, protocol.TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' (text) and 'messages' (a chat)", code="invalid_value")
        messages = protocol.message_dicts(req.messages) if req.messages is not None else None
        try:
            if req.prompt is not None:
                ids = await off_loop(llm.tokenizer.encode, req.prompt, req.add_special_tokens is not False)
            else:
                ids = await off_loop(llm.tokenizer.encode_chat, messages, req.add_generation_prompt is not False)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param="prompt" if req.prompt is not None else "messages") from None
        return _json({"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids})

    @app.post("/detokenize", dependencies=api)
    async def detokenize(request: Request):
        llm, req = await parsed_request(request, protocol.DetokenizeRequest)
        vocab = llm.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return _json({"prompt": llm.tokenizer.decode(req.tokens)})

    @app.post("/v1/completions", dependencies=api)
    async def completions(request: Request):
        llm, req = await parsed_request(request, protocol.CompletionRequest)
        check_queue()
        prompts = await off_loop(_completion_prompts, req.prompt, llm)
        job = protocol.build_job(req, prompts, llm)
        handle = submit(job)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": settings.model_name}
        if job.stream:
            return StreamingResponse(stream_completion(handle, request, job, head), media_type="text/event-stream",
                                     headers=SSE_HEADERS)  # fmt: skip
        results = await collect(handle, request)
        if results is None:
            return Response(status_code=499)  # the client is gone: nobody reads this
        choices = [{"index": i, "text": r.text, "finish_reason": protocol.finish_reason(r.finish_reason),
                    "logprobs": completion_logprobs(r.token_ids, r.logprobs, text_offsets(r.token_ids))
                    if r.logprobs is not None else None}
                   for i, r in enumerate(results)]  # fmt: skip
        return _json(dict(head, choices=choices, usage=usage(job, results)))

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(request: Request):
        llm, req = await parsed_request(request, protocol.ChatRequest)
        check_queue()
        if not req.messages:
            raise APIError(400, "'messages' must hold at least one message", param="messages")
        messages = protocol.message_dicts(req.messages)
        try:  # the chat template, as `ringfuse generate` applies it
            prompts = [await off_loop(llm.tokenizer.encode_chat, messages)]
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        job = protocol.build_job(req, prompts, llm)
        handle = submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": now, "model": settings.model_name}
        if job.stream:
            head["object"] = "chat.completion.chunk"
            return StreamingResponse(stream_chat(handle, request, job, head), media_type="text/event-stream",
                                     headers=SSE_HEADERS)  # fmt: skip
        results = await collect(handle, request)
        if results is None:
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                    "logprobs": chat_logprobs(r.token_ids, r.logprobs) if r.logprobs is not None else None,
                    "finish_reason": protocol.finish_reason(r.finish_reason)}
                   for i, r in enumerate(results)]  # fmt: skip
        return _json(dict(head, choices=choices, usage=usage(job, results)))

    async def collect(handle: RequestHandle, request: Request) -> list[GenerationResult] | None:
        """Every sequence's result, or None if the client went away first."""
        results: list[GenerationResult | None] = [None] * len(handle.sequences)
        async for pos, ev in events(handle, request):
            if ev.finished:
                results[pos] = ev.result
        return None if any(r is None for r in results) else results

    async def stream_sse(handle: RequestHandle, request: Request, job: protocol.Job, head: dict, chunks, first=()):
        """SSE: ``first`` chunks, then chunks(position, event) per event, the usage chunk when
        asked, ``data: [DONE]``. An error after the headers went out is an error event."""
        results: list[GenerationResult | None] = [None] * len(handle.sequences)
        extra = {"usage": None} if job.include_usage else {}  # OpenAI: null on every chunk but the last
        try:
            for chunk in first:
                yield _sse(dict(head, **chunk, **extra))
            async for pos, ev in events(handle, request):
                if ev.finished:
                    results[pos] = ev.result
                for chunk in chunks(pos, ev):
                    yield _sse(dict(head, **chunk, **extra))
            if any(r is None for r in results):
                return  # the client went away
            if job.include_usage:
                yield _sse(dict(head, choices=[], usage=usage(job, results)))
        except APIError as e:
            yield _sse(e.body())
        except Exception:  # the headers are out: the client gets a clean error event, the log the traceback
            log.exception("ringfuse serve: a streaming response failed")
            yield _sse(APIError(500, "internal server error; see the server log", "server_error",
                                code="internal_error").body())  # fmt: skip
        yield "data: [DONE]\n\n"

    def stream_completion(handle, request, job, head):
        # where each sequence's next token's text starts, as text_offsets() counts (the text
        # streamed so far lags while a stop string may be starting)
        offsets = [0] * len(handle.sequences)
        decoders = [engine.llm.tokenizer.decoder() for _ in handle.sequences] if job.logprobs is not None else []

        def chunks(pos: int, ev: TokenEvent):
            lp = None
            if ev.logprobs is not None:
                lp = completion_logprobs([ev.token_id], [ev.logprobs], [offsets[pos]])
                offsets[pos] += len(decoders[pos].push(ev.token_id))
            if not (ev.text or ev.finished or lp is not None):
                return
            reason = protocol.finish_reason(ev.result.finish_reason) if ev.finished else None
            yield {"choices": [{"index": pos, "text": ev.text, "logprobs": lp, "finish_reason": reason}]}

        return stream_sse(handle, request, job, head, chunks)

    def stream_chat(handle, request, job, head):
        def chunks(pos: int, ev: TokenEvent):
            if not (ev.text or ev.finished or ev.logprobs is not None):
                return
            lp = chat_logprobs([ev.token_id], [ev.logprobs]) if ev.logprobs is not None else None
            reason = protocol.finish_reason(ev.result.finish_reason) if ev.finished else None
            delta = {"content": ev.text} if ev.text or not ev.finished else {}
            yield {"choices": [{"index": pos, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

        first = [{"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]} for i in range(len(handle.sequences))]  # fmt: skip
        return stream_sse(handle, request, job, head, chunks, first)

    return app


class _InternalErrors:
    """Any exception no handler took becomes a 500 in OpenAI's shape with a generic message;
    the traceback goes to the server's log, never to the client. (Starlette's own handler
    for Exception re-raises after responding, and uvicorn then drops the connection.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:  # the client left while sending its body: nothing failed, nobody to answer
            log.debug("ringfuse serve: %s %s: the client disconnected", scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("ringfuse serve: %s %s failed", scope.get("method"), scope.get("path"))
            if started:  # too late for a status: the client sees the response cut short
                raise
            error = APIError(500, "internal server error; see the server log", "server_error", code="internal_error")
            await error.response()(scope, receive, send)


def _completion_prompts(prompt, llm: LLM) -> list[list[int]]:
    """/v1/completions' prompt as token ids: text is encoded as given (no chat template),
    token ids are checked against the vocabulary. Lengths are checked by protocol.build_job."""
    one = isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt))
    prompts = [prompt] if one else list(prompt)
    if not prompts:
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    if len(prompts) > protocol.MAX_SEQUENCES:
        raise APIError(400, f"at most {protocol.MAX_SEQUENCES} prompts per request, got {len(prompts)}", param="prompt")
    vocab = llm.config.vocab_size
    out = []
    for p in prompts:
        if isinstance(p, str):
            try:
                ids = llm.tokenizer.encode(p)
            except (TypeError, ValueError) as e:  # text the tokenizer refuses (lone surrogates)
                raise APIError(400, str(e), param="prompt") from None
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
        if not ids:
            raise APIError(400, "a prompt must hold at least one token", param="prompt")
        out.append(ids)
    return out


def _too_large(size: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(413, f"the request body has {'more than ' * at_least}{size} bytes; this server takes at most "
                    f"{limit} (--max-body-bytes)", code="request_too_large")  # fmt: skip


def _local_tokenizer_dir(model_path) -> str | None:
    """The model's folder when it holds a tokenizer.json (an HF folder), else None (a GGUF
    file carries its tokenizer inside, which a balancer cannot read)."""
    folder = Path(model_path)
    return str(folder.resolve()) if folder.is_dir() and (folder / "tokenizer.json").is_file() else None


def _version() -> str:
    try:
        return version("ringfuse")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "unknown"


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps -inf and NaN
