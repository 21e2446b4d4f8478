"""One engine loop, many clients.

A dedicated thread owns the LLM: it loads the model, then steps the engine while any request
is unfinished and sleeps on an Event otherwise. The asyncio side never touches the LLM's
scheduling state; it hands commands (add, abort) to the thread through a deque and a wake-up
Event, and the thread hands each step's tokens back with ``loop.call_soon_threadsafe`` into
per-request asyncio queues. Neither side waits for the other: a step never awaits the event
loop, and a coroutine never blocks on a step.

Accounting (waiting / running counts, the metrics hooks) lives on the event-loop side, so
it needs no locks: a sequence is *waiting* from submit() until its first token arrives
(admission and prefill happen in the same engine step), then *running* until it finishes
or is aborted.

Under tensor parallelism the thread also tells the other ranks, once per iteration, which
commands it carried out and whether it steps (a ``Mirror``: serve/tensor_parallel.py), and
sends them a heartbeat while idle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Protocol

from ..runtime.engine import LLM, GenerationResult, TokenEvent
from ..runtime.sampling import SamplingParams

log = logging.getLogger("ringfuse.serve")

LOADING, READY, DEAD, STOPPED = "loading", "ready", "dead", "stopped"


class QueueFull(Exception):
    """The waiting queue already holds max_waiting sequences."""


class EngineUnavailable(Exception):
    """The engine is not serving (still loading, dead or stopped); the message says which."""


@dataclasses.dataclass
class Failure:
    """Put in a request's queue instead of a token: the request cannot go on."""

    message: str  # safe to show a client (no traceback, no internals)
    status: int  # the HTTP status it means: 400 refused by the engine, 500 the engine failed, 503 shutting down


DISCONNECTED = object()  # put in a request's queue by the app when its client goes away


class Observer(Protocol):
    """What the engine loop reports, on the event loop's thread (metrics.ServerMetrics)."""

    def first_token(self, prompt_tokens: int, ttft_s: float) -> None: ...
    def token(self, inter_token_s: float | None) -> None: ...  # None for a sequence's first token
    def finished(self, reason: str, e2e_s: float | None, queue_s: float | None) -> None: ...  # None: not timed


@dataclasses.dataclass
class Sequence:
    """One engine request: a choice of an HTTP request (n choices x prompts)."""

    engine_index: int
    prompt_len: int
    arrival: float  # time.perf_counter() at submit
    first: float | None = None  # when its first token was produced
    last: float | None = None  # when its latest token was produced
    finished: bool = False


class RequestHandle:
    """An HTTP request's sequences and the queue their events arrive in, as
    (sequence position, TokenEvent) tuples, a Failure, or DISCONNECTED."""

    def __init__(self, sequences: list[Sequence]):
        self.sequences = sequences
        self.queue: asyncio.Queue = asyncio.Queue()

    @property
    def unfinished(self) -> list[Sequence]:
        return [s for s in self.sequences if not s.finished]


class Mirror(Protocol):
    """What the engine thread tells the other tensor-parallel ranks (tensor_parallel.Leader)."""

    heartbeat_s: float  # the longest the thread stays silent while idle

    def send(self, commands: list[tuple], step: bool) -> None: ...  # before this iteration's step
    def heartbeat(self) -> None: ...
    def stop(self) -> None: ...


def apply_commands(llm: LLM, commands: list[tuple]) -> list[tuple[int, str]]:
    """Carry out the loop's commands on ``llm`` in order: ("add", index, prompt ids, params)
    and ("abort", index). Returns the (index, reason) of the adds the engine refused."""
    refused = []
    for op, index, *rest in commands:
        if op == "abort":
            llm.abort(index)
            continue
        try:
            llm.add_request(*rest, index=index, ranks_agree=True)  # under TP, rank 0 broadcasts the commands
        except (ValueError, TypeError) as e:
            refused.append((index, str(e)))
    return refused


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot taken by the engine thread after each loop iteration."""

    kv_cache_usage: float = 0.0
    kv_tokens: int = 0  # tokens the running requests hold in the KV cache (prompt + generated)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class EngineLoop:
    """The engine thread and the event loop's handle on it.

    ``make_llm`` runs on the engine thread (loading the model there lets the HTTP server
    answer probes meanwhile: /ready says 503 until it returns). ``observer`` gets the metric
    events. On the event loop, ``on_ready()`` is called once the model is loaded and
    ``on_dead(message, while_loading)`` when it fails to load or the loop dies. ``mirror``:
    the other tensor-parallel ranks' channel (None: a single rank)."""

    def __init__(self, make_llm: Callable[[], LLM], *, max_waiting: int, observer: Observer | None = None,
                 on_ready: Callable[[], None] | None = None, on_dead: Callable[[str, bool], None] | None = None,
                 mirror: Mirror | None = None):  # fmt: skip
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting must be an int >= 1, got {max_waiting!r}")
        self._make_llm, self.max_waiting, self.observer = make_llm, max_waiting, observer
        self._on_ready, self._on_dead, self._mirror = on_ready, on_dead, mirror
        self.llm: LLM | None = None  # set by the engine thread once loaded
        self.state = LOADING
        self.error: str | None = None  # why the engine is dead (client-safe)
        self.stats = EngineStats()
        self.num_waiting = self.num_running = 0  # sequences, counted on the event loop
        self._commands: deque = deque()  # (op, ...) from the event loop; deque appends/pops are thread-safe
        self._wake = threading.Event()
        self._stopping = False
        self._live: dict[int, tuple[RequestHandle, int]] = {}  # engine index -> (handle, position)
        self._indexes = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle (event loop) ------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="ringfuse-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread: unfinished requests are aborted (their blocks freed) and their
        clients get a Failure. A model still loading cannot be interrupted: the thread is a
        daemon, so the process can exit without it."""
        self.end_requests()
        if self._thread is not None:
            self._thread.join(timeout if self.state != LOADING else 0)

    def end_requests(self) -> None:
        """The first half of stop(), without waiting for the thread: no request is taken from
        now on, and every open one gets its Failure (503 "the server is shutting down") at once;
        the thread aborts them at the end of its current step."""
        self._stopping = True
        self._wake.set()
        if self.state != DEAD:
            self.state = STOPPED
        self._fail_all("the server is shutting down", 503)

    @property
    def ready(self) -> bool:
        return self.state == READY

    def check_serving(self) -> None:
        if self.state == LOADING:
            raise EngineUnavailable("the model is still loading; retry shortly (GET /ready says 200 once it can serve)")
        if self.state == DEAD:
            raise EngineUnavailable(f"the engine has stopped: {self.error}")
        if self.state == STOPPED:
            raise EngineUnavailable("the server is shutting down")

    # ---- requests (event loop) -------------------------------------------------------------

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> RequestHandle:
        """Queue the sequences of one HTTP request. QueueFull when max_waiting sequences are
        already waiting (a request is all or nothing, and one is always let in when the
        queue has room, so the queue holds at most max_waiting + one request's sequences)."""
        self.check_serving()
        if self.num_waiting >= self.max_waiting:
            raise QueueFull(f"{self.num_waiting} requests are waiting (--max-waiting {self.max_waiting})")
        now = time.perf_counter()
        handle = RequestHandle([Sequence(next(self._indexes), len(ids), now) for ids, _ in requests])
        for pos, (seq, (ids, params)) in enumerate(zip(handle.sequences, requests)):
            self._live[seq.engine_index] = (handle, pos)
            self._commands.append(("add", seq.engine_index, ids, params))
        self.num_waiting += len(requests)
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Abort the handle's unfinished sequences (a client went away or failed): the engine
        frees their cache blocks before its next step."""
        for seq in handle.unfinished:
            if self._live.pop(seq.engine_index, None) is None:
                continue
            self._end(seq, "abort", None, None)
            self._commands.append(("abort", seq.engine_index))
        self._wake.set()

    def _end(self, seq: Sequence, reason: str, now: float | None, result: GenerationResult | None) -> None:
        seq.finished = True
        if seq.first is None:
            self.num_waiting -= 1
        else:
            self.num_running -= 1
        if self.observer is not None:
            e2e = queue = None
            if result is not None:  # finished normally: timed from arrival; queued until admission
                e2e = now - seq.arrival
                queue = max(0.0, (seq.first - seq.arrival) - result.prefill_s)
            self.observer.finished(reason, e2e, queue)

    def _deliver(self, events: list[TokenEvent], now: float) -> None:
        """A step's tokens, on the event loop: account them and wake their requests."""
        obs = self.observer
        for ev in events:
            entry = self._live.get(ev.index)
            if entry is None:  # aborted while this step ran
                continue
            handle, pos = entry
            seq = handle.sequences[pos]
            if seq.first is None:
                seq.first = now
                self.num_waiting -= 1
                self.num_running += 1
                if obs is not None:
                    obs.first_token(seq.prompt_len, now - seq.arrival)
            if obs is not None:
                obs.token(None if seq.last is None else now - seq.last)
            seq.last = now
            if ev.finished:
                del self._live[ev.index]
                reason = "length" if ev.result.finish_reason == "length" else "stop"
                self._end(seq, reason, now, ev.result)
            handle.queue.put_nowait((pos, ev))

    def _refuse(self, index: int, message: str) -> None:
        """The engine refused a sequence (add_request raised): fail its request."""
        entry = self._live.pop(index, None)
        if entry is not None:
            handle, pos = entry
            self._end(handle.sequences[pos], "error", None, None)
            handle.queue.put_nowait(Failure(message, 400))

    def _fail_all(self, message: str, status: int) -> None:
        for index in list(self._live):
            handle, pos = self._live.pop(index)
            self._end(handle.sequences[pos], "error", None, None)
            handle.queue.put_nowait(Failure(message, status))

    def _died(self, message: str, while_loading: bool) -> None:
        self._fail_all(f"the engine has stopped: {message}", 500)
        if self._on_dead is not None:
            self._on_dead(message, while_loading)

    # ---- the engine thread -------------------------------------------------------------------

    def _die(self, message: str, while_loading: bool) -> None:
        # the state first, here: from now on submit() refuses, so every request that got in
        # before is in _live when _died fails them on the event loop
        self.state, self.error = DEAD, message
        self._post(self._died, message, while_loading)

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop has closed: the server is gone
            pass

    def _run(self) -> None:
        try:
            llm = self._make_llm()
        except Exception as e:
            log.exception("ringfuse serve: the model failed to load")
            self._die(f"the model failed to load: {type(e).__name__}: {e}", True)
            return
        self.llm = llm
        self.stats = self._snapshot(llm)
        if not self._stopping:
            self.state = READY
            if self._on_ready is not None:
                self._post(self._on_ready)
        try:
            self._serve(llm)
        except Exception as e:  # the loop cannot go on: every client gets a clean error, the log the traceback
            log.exception("ringfuse serve: the engine loop died")
            self._die(f"internal error ({type(e).__name__}); see the server log", False)
        finally:
            llm.abort_all()  # leave no request holding cache blocks (the LLM may be reused)
            self.stats = self._snapshot(llm)

    def _serve(self, llm: LLM) -> None:
        mirror = self._mirror
        while True:
            self._wake.clear()  # before reading the commands: a command appended after this wakes the wait below
            if self._stopping:
                if mirror is not None:
                    mirror.stop()
                return
            commands = [self._commands.popleft() for _ in range(len(self._commands))]
            for index, reason in apply_commands(llm, commands):
                self._post(self._refuse, index, reason)
            step = llm.has_unfinished()
            if mirror is not None and (commands or step):
                mirror.send(commands, step)
            if not step:
                self.stats = self._snapshot(llm)
                if not self._wake.wait(None if mirror is None else mirror.heartbeat_s) and mirror is not None:
                    mirror.heartbeat()
                continue
            events = llm.step()
            now = time.perf_counter()
            self.stats = self._snapshot(llm)
            if events:
                self._post(self._deliver, events, now)

    @staticmethod
    def _snapshot(llm: LLM) -> EngineStats:
        return EngineStats(llm.kv_cache_usage(), sum(r.length for r in llm.running), llm.prefix_cache_queries,
                           llm.prefix_cache_hits)
