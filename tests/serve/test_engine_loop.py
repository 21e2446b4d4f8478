"""One engine loop, many clients: concurrent requests share the batch, a client that goes
away is aborted and frees its KV blocks while the batch goes on, a burst past --max-waiting
gets 429 at once, and the probes follow the engine's life (loading, ready, dead)."""

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import socket
import threading
import types
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringfuse.runtime.engine import GenerationResult, TokenEvent
from ringfuse.runtime.sampling import SamplingParams
from ringfuse.serve.engine_loop import EngineLoop, Failure, QueueFull
from ringfuse.serve.tensor_parallel import STEP, STOP, follow

from .conftest import CHAT_PROMPT, COMPLETION_PROMPT, MAX_BATCH, MAX_MODEL_LEN, TIMEOUT_S, serving, wait_for

# a stream that cannot finish during a test: it holds its batch slot until its client goes away
LONG = {"prompt": COMPLETION_PROMPT, "max_tokens": MAX_MODEL_LEN - 16, "temperature": 0, "ignore_eos": True,
        "stream": True}  # fmt: skip


def _metrics(http) -> dict:
    text = http.get("/metrics").text
    return {s.name + "".join(f"/{v}" for k, v in sorted(s.labels.items()) if k != "model_name"): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def _data(lines) -> dict:
    """The next `data: {...}` event of an SSE line iterator."""
    for line in lines:
        if line.startswith("data: {"):
            return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended")


def test_a_client_gone_mid_stream_is_aborted_frees_its_blocks_and_the_batch_goes_on(server, offline):
    """Two streams share the batch; the first client leaves: its request is aborted at once,
    the other goes on to its full length with the tokens it gets alone, and every KV-cache
    block comes back."""
    chat = {"messages": [{"role": "user", "content": CHAT_PROMPT}], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with server.http() as probe, server.http() as http_a, server.http() as http_b:
        before = _metrics(probe)
        aborted = before["ringfuse:request_success_total/abort"]
        with http_a.stream("POST", "/v1/completions", json=LONG) as a:
            lines_a = a.iter_lines()
            assert _data(lines_a)["choices"][0]["text"]  # A decodes
            with http_b.stream("POST", "/v1/chat/completions", json=chat) as b:
                lines_b = b.iter_lines()
                assert _data(lines_b)["choices"][0]["delta"]["role"] == "assistant"
                pieces = [_data(lines_b)["choices"][0]["delta"]["content"]]  # B's first token: B decodes too
                seen = _metrics(probe)
                assert seen["ringfuse:num_requests_running"] == 2  # one batch
                assert seen["ringfuse:kv_cache_usage_perc"] > 0
                a.close()  # client A goes away mid-stream
                wait_for(lambda: _metrics(probe)["ringfuse:request_success_total/abort"] == aborted + 1, "A's abort")
                reasons, rest = [], [line for line in lines_b if line]
                for line in rest[:-1]:
                    choice = json.loads(line.removeprefix("data: "))["choices"][0]
                    pieces.append(choice["delta"].get("content", ""))
                    reasons.append(choice["finish_reason"])
                assert rest[-1] == "data: [DONE]" and reasons[-1] == "length"
        text = "".join(pieces)
        assert text.startswith(offline["chat"].text)  # greedy, as alone (B's first 8 of 24 tokens)

        def idle():
            m = _metrics(probe)
            return m["ringfuse:num_requests_running"] == m["ringfuse:num_requests_waiting"] == 0 and \
                m["ringfuse:kv_cache_usage_perc"] == 0  # fmt: skip

        wait_for(idle, "every block back")
        after = _metrics(probe)
        assert after["ringfuse:request_success_total/abort"] == aborted + 1
        generated = after["ringfuse:generation_tokens_total"] - before["ringfuse:generation_tokens_total"]
        assert generated < LONG["max_tokens"]  # A stopped where its client left, not at its max_tokens


def test_a_non_streaming_client_that_goes_away_is_aborted(server):
    """The connection closes while the request runs (no response started): aborted too."""
    with server.http() as probe:
        aborted = _metrics(probe)["ringfuse:request_success_total/abort"]
        payload = json.dumps(dict(LONG, stream=False)).encode()
        url = urlsplit(server.url)
        with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT_S) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
            wait_for(lambda: _metrics(probe)["ringfuse:num_requests_running"] == 1, "the request to run")
        wait_for(lambda: _metrics(probe)["ringfuse:request_success_total/abort"] == aborted + 1, "the abort")
        wait_for(lambda: _metrics(probe)["ringfuse:kv_cache_usage_perc"] == 0, "every block back")


def test_a_burst_past_max_waiting_gets_429_at_once_and_the_server_goes_on(llm, offline):
    """The batch is full (two endless streams); of a burst of 4 x max_waiting requests,
    max_waiting wait and the rest get 429 with Retry-After without waiting; once the batch
    frees up, the waiting ones are served, and so is a later request."""
    max_waiting = 2
    burst = 4 * max_waiting
    def post(i):
        with served.http() as http:
            return http.post("/v1/completions", json={"prompt": f"Count to {i}:", "max_tokens": 2})

    with serving(llm, max_waiting=max_waiting) as served, served.http() as probe:
        # exits in reverse: the streams' clients leave (freeing the batch) before the pool waits for its threads
        with concurrent.futures.ThreadPoolExecutor(burst) as pool, contextlib.ExitStack() as holding:
            lines = []  # kept: a line iterator collected early would close its stream
            for _ in range(MAX_BATCH):
                client = holding.enter_context(served.http())
                lines.append(holding.enter_context(client.stream("POST", "/v1/completions", json=LONG)).iter_lines())
                assert _data(lines[-1])["choices"]  # decoding
            assert _metrics(probe)["ringfuse:num_requests_running"] == MAX_BATCH  # the batch is full
            futures = [pool.submit(post, i) for i in range(burst)]
            refused = []
            for f in concurrent.futures.as_completed(futures, timeout=TIMEOUT_S):
                refused.append(f.result())
                if len(refused) == burst - max_waiting:
                    break  # the rest wait for a batch slot
            assert [r.status_code for r in refused] == [429] * (burst - max_waiting)
            for r in refused:
                err = r.json()["error"]
                assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
                assert r.headers["retry-after"] == "1"
            assert _metrics(probe)["ringfuse:num_requests_waiting"] == max_waiting
            holding.pop_all().close()  # the endless streams' clients leave: the waiting requests run
            done, pending = concurrent.futures.wait(futures, timeout=TIMEOUT_S)
            assert not pending
        answered = [f.result() for f in futures if f.result().status_code != 429]
        assert [r.status_code for r in answered] == [200] * max_waiting
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in answered)
        assert probe.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
        wait_for(lambda: _metrics(probe)["ringfuse:kv_cache_usage_perc"] == 0, "every block back")


def test_ready_is_503_until_the_model_is_loaded(llm, offline):
    gate = threading.Event()

    def slow_load():
        assert gate.wait(TIMEOUT_S)
        return llm

    try:
        with serving(llm, make_llm=slow_load, wait_ready=False) as served, served.http() as http:
            r = http.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
            assert http.get("/health").status_code == 200  # alive while loading
            for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "Hi"})):
                r = http.request(method, path, json=body)
                assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
                assert "loading" in r.json()["error"]["message"]
            gate.set()
            assert served.ready.wait(TIMEOUT_S)
            assert http.get("/ready").json() == {"status": "ready", "model": "SmolLM2-135M-Instruct"}
            assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
    finally:
        gate.set()


def test_a_model_that_fails_to_load(llm):
    def broken_load():
        raise OSError("no such model file")

    with serving(llm, make_llm=broken_load, wait_ready=False) as served, served.http() as http:
        (message, while_loading), = wait_for(lambda: served.dead, "on_dead")
        assert while_loading and "the model failed to load: OSError: no such model file" in message
        r = http.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "dead"
        assert http.get("/health").status_code == 503
        assert http.post("/v1/completions", json={"prompt": "Hi"}).status_code == 503


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_that_dies_fails_its_requests_cleanly(llm, offline, monkeypatch, stream):
    """The engine loop raises mid-generation: the request in flight gets a clean error (a
    500, or an error event once the stream has started) that leaks nothing, the probes say
    503, and no request keeps cache blocks."""
    steps, real_step = itertools.count(), llm.step

    def dying_step():
        if next(steps) == 2:  # prefill, one decode, then this
            raise RuntimeError("secret internal detail")
        return real_step()

    monkeypatch.setattr(llm, "step", dying_step)
    body = {"prompt": COMPLETION_PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": stream}
    with serving(llm) as served, served.http() as http:
        r = http.post("/v1/completions", json=body)
        if stream:
            assert r.status_code == 200
            events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert len(events) >= 4  # tokens came before the error event
        else:
            assert r.status_code == 500
            error = r.json()["error"]
        assert error["type"] == "server_error" and "the engine has stopped" in error["message"]
        assert "secret" not in r.text and "Traceback" not in r.text
        assert served.dead and served.dead[0][1] is False
        assert http.get("/ready").status_code == 503 and http.get("/health").status_code == 503
        assert http.post("/v1/completions", json={"prompt": "Hi"}).status_code == 503
    assert not llm.has_unfinished() and llm.kv_cache_usage() == 0


class _ScriptedLLM:
    """What EngineLoop uses of an LLM, scripted: every step gives each running request one
    token and finishes it at its max_new_tokens; a prompt [0] is refused by add_request."""

    prefix_cache_queries = prefix_cache_hits = 0

    def __init__(self):
        self.requests: dict[int, list] = {}  # index -> [params, tokens so far]

    @property
    def running(self) -> list:  # as LLM.running: the admitted requests, with their lengths in the cache
        return [types.SimpleNamespace(length=1 + tokens) for _, tokens in self.requests.values()]

    def add_request(self, ids, params, index, *, ranks_agree=False):
        if ids == [0]:
            raise ValueError("the request needs 9999 cache tokens but the cache holds 16 (raise kv_cache_tokens)")
        self.requests[index] = [params, 0]

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        events = []
        for index, entry in list(self.requests.items()):
            entry[1] += 1
            done = entry[1] == entry[0].max_new_tokens
            result = GenerationResult([1], [5] * entry[1], "x" * entry[1], "length", 0.0, 0.0) if done else None
            events.append(TokenEvent(index, 5, "x", done, result))
            if done:
                del self.requests[index]
        return events

    def abort(self, index):
        return self.requests.pop(index, None) is not None

    def abort_all(self):
        self.requests.clear()

    def kv_cache_usage(self):
        return 0.5 if self.requests else 0.0


def test_engine_loop_accounting_refusals_and_aborts():
    """Without a model: waiting -> running -> finished counts, a sequence the engine refuses
    fails its request with a 400, an abort frees the engine's request, stop() fails the rest."""
    llm = _ScriptedLLM()

    async def scenario():
        engine = EngineLoop(lambda: llm, max_waiting=2)
        engine.start(asyncio.get_running_loop())
        await asyncio.wait_for(_until(lambda: engine.ready), TIMEOUT_S)
        three = SamplingParams(max_new_tokens=3)
        ok = engine.submit([([1], three), ([2], three)])
        assert engine.num_waiting == 2
        with pytest.raises(QueueFull):
            engine.submit([([3], three)])
        got = [await asyncio.wait_for(ok.queue.get(), TIMEOUT_S) for _ in range(6)]
        assert sorted((pos, ev.finished) for pos, ev in got) == [(0, False), (0, False), (0, True),
                                                                  (1, False), (1, False), (1, True)]  # fmt: skip
        assert engine.num_waiting == engine.num_running == 0
        refused = engine.submit([([0], three)])
        failure = await asyncio.wait_for(refused.queue.get(), TIMEOUT_S)
        assert isinstance(failure, Failure) and failure.status == 400 and "raise kv_cache_tokens" in failure.message
        assert engine.num_waiting == 0
        endless = engine.submit([([4], SamplingParams(max_new_tokens=10**9))])
        await asyncio.wait_for(endless.queue.get(), TIMEOUT_S)
        assert engine.num_running == 1
        engine.abort(endless)
        await asyncio.wait_for(_until(lambda: not llm.requests), TIMEOUT_S)  # the engine dropped it
        assert engine.num_running == 0
        last = engine.submit([([5], SamplingParams(max_new_tokens=10**9))])
        engine.stop()
        while not isinstance(item := await asyncio.wait_for(last.queue.get(), TIMEOUT_S), Failure):
            pass  # tokens produced before the stop
        assert item.status == 503 and not llm.requests and engine.num_running == engine.num_waiting == 0

    asyncio.run(scenario())


async def _until(condition):
    while not condition():
        await asyncio.sleep(0.005)


class _LoggingLLM(_ScriptedLLM):
    """A _ScriptedLLM that logs, at every step, which requests it held and how far they were."""

    def __init__(self):
        super().__init__()
        self.steps: list[list] = []

    def step(self):
        self.steps.append(sorted((index, tokens) for index, (_, tokens) in self.requests.items()))
        return super().step()


class _QueueMirror:
    """A tensor_parallel.Leader without torch.distributed: its messages go into a queue that
    a follower thread reads."""

    heartbeat_s = 0.02

    def __init__(self):
        import queue

        self.messages = queue.Queue()
        self.sent: list[tuple[int, list]] = []

    def _put(self, flags, commands):
        self.sent.append((flags, commands))
        self.messages.put((flags, commands))

    def send(self, commands, step):
        self._put(STEP if step else 0, list(commands))

    def heartbeat(self):
        self._put(0, [])

    def stop(self):
        self._put(STOP, [])


def test_a_follower_fed_what_the_engine_loop_sends_steps_exactly_as_it():
    """The engine loop tells its mirror every add and abort (refused adds included) before the
    step they take effect in, beats while idle, and says STOP when stopped; a follower that
    carries that out (tensor_parallel.follow) holds the same requests at every step."""
    leader, follower, mirror = _LoggingLLM(), _LoggingLLM(), _QueueMirror()
    following = threading.Thread(target=follow, args=(follower, lambda: mirror.messages.get(timeout=TIMEOUT_S)))

    async def scenario():
        engine = EngineLoop(lambda: leader, max_waiting=8, mirror=mirror)
        engine.start(asyncio.get_running_loop())
        await asyncio.wait_for(_until(lambda: engine.ready), TIMEOUT_S)
        following.start()
        a = engine.submit([([1], SamplingParams(max_new_tokens=3)), ([0], SamplingParams(max_new_tokens=3))])
        endless = engine.submit([([2], SamplingParams(max_new_tokens=10**9))])
        for _ in range(4):  # a's first choice finishes, its second is refused
            await asyncio.wait_for(a.queue.get(), TIMEOUT_S)
        await asyncio.wait_for(endless.queue.get(), TIMEOUT_S)
        engine.abort(endless)
        await asyncio.wait_for(_until(lambda: not leader.requests), TIMEOUT_S)
        beats = len(mirror.sent)
        await asyncio.wait_for(_until(lambda: len(mirror.sent) >= beats + 3), TIMEOUT_S)  # idle: heartbeats
        assert all(m == (0, []) for m in mirror.sent[beats:beats + 3])
        late = engine.submit([([3], SamplingParams(max_new_tokens=2))])
        for _ in range(2):
            await asyncio.wait_for(late.queue.get(), TIMEOUT_S)
        engine.stop()

    asyncio.run(scenario())
    following.join(TIMEOUT_S)
    assert not following.is_alive() and mirror.sent[-1] == (STOP, [])
    assert follower.steps == leader.steps and len(leader.steps) >= 5
    ops = [op for flags, commands in mirror.sent for op, *_ in commands]
    assert ops.count("add") == 4 and ops.count("abort") == 1
