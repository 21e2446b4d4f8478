"""`ringfuse serve --replicas`: two real ringfuse workers behind a real sglang-router, both
started by serve/replicas.py (one set shared by the module). The openai client through the
router; the fault test (a replica SIGKILLed under load: new requests all succeed, the killed
one's streams end with a clean error, nothing hangs); the dead replica restarted and taken
back; then nothing is left: no process, no /dev/shm segment. And the command as a user runs
it, stopped with SIGTERM. Every request loop is bounded in count and time."""

import collections
import concurrent.futures
import os
import re
import signal
import time

import httpx
import openai
import pytest

from ringfuse.serve.replicas import ReplicaSet

from .conftest import MODEL_NAME, TIMEOUT_S, wait_for
from .test_cli import ServeProcess

# small and fast: a short context, two sequences per batch, one thread each (2 cores here)
WORKER_FLAGS = ["--served-model-name", MODEL_NAME, "--max-model-len", "256", "--max-batch", "2",
                "--log-level", "warning"]  # fmt: skip
STREAMS = 4  # in flight when a replica is killed: two per replica's batch
STREAM_TOKENS = 96  # long enough to be mid-stream at the kill (all STREAMS arrived), short enough to end soon
NEW_REQUESTS = 6  # sent through the router right after the kill
CLEAN_ERROR_S = 10.0  # the killed replica's streams must have failed within this after the kill


API_KEY = "sesame"  # the workers check it; the router passes the clients' Authorization header on


def _client(url: str, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT_S)


def _shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("ringfuse-")}


def _left_behind(pids) -> list[str]:
    """Live processes (zombies aside) that are one of ``pids`` or in one of their process
    groups (each child leads its own group)."""
    pids, left = set(pids), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        state, _, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]  # the fields after "pid (comm) "
        if state != "Z" and (int(entry) in pids or int(pgrp) in pids):
            left.append(stat[:120])
    return left


def _command_lines(pids) -> list[str]:
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            out.append(f.read().replace(b"\0", b" ").decode())
    return out


def _load(worker) -> dict:
    (load,) = httpx.get(f"{worker.url}/get_load", timeout=TIMEOUT_S).json()
    return load


def _router_health(replicas) -> dict:
    """{worker url: healthy?} as the router sees it (GET /workers)."""
    listed = httpx.get(f"{replicas.url}/workers", timeout=TIMEOUT_S).json()["workers"]
    return {w["url"].rstrip("/"): w["is_healthy"] for w in listed}


@pytest.fixture(scope="module")
def replicas(gguf_path):
    shm_before = _shm_segments()
    env = dict(os.environ, RINGFUSE_API_KEY=API_KEY)  # as `ringfuse serve --replicas 2 --api-key KEY` passes it
    rs = ReplicaSet(["--model", str(gguf_path), *WORKER_FLAGS], 2, threads=1, port=0, env=env, log=None)
    rs.start(timeout=TIMEOUT_S * 2)
    rs.shm_before = shm_before
    try:
        yield rs
    finally:
        rs.stop()


def test_completion_and_streams_through_the_router(replicas):
    with pytest.raises(openai.AuthenticationError):  # a worker's 401, through the router
        _client(replicas.url, api_key="wrong").completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=1)
    client = _client(replicas.url)
    assert MODEL_NAME in [m.id for m in client.models.list().data]  # the workers' served name
    out = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=6,
                                    temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    stream = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=6,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text  # greedy: the same
    assert chunks[-1].usage.completion_tokens == 6
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=4, temperature=0, stream=True,
                                          messages=[{"role": "user", "content": "Hi!"}])  # fmt: skip
    pieces = [c.choices[0].delta.content or "" for c in chat if c.choices]
    assert "".join(pieces)


def test_a_replica_killed_under_load(replicas):
    """STREAMS streams in flight across the replicas; SIGKILL the one running most of them. Every
    new request through the router succeeds (it retries on another replica); each stream of
    the killed replica ends with a clean client-side error soon after the kill; the others
    complete in full; nothing hangs."""
    client = _client(replicas.url)

    def stream(i: int):
        """(outcome, completion tokens, time.monotonic() at the end): 'done' or the exception."""
        tokens = None
        try:
            for chunk in client.completions.create(model=MODEL_NAME, prompt=f"Tell story number {i}:",
                                                   max_tokens=STREAM_TOKENS, temperature=0, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}):  # fmt: skip
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return "done", tokens, time.monotonic()
        except Exception as e:  # noqa: BLE001 (what the client raised is what is checked)
            return e, tokens, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(STREAMS + NEW_REQUESTS) as pool:
        streams = [pool.submit(stream, i) for i in range(STREAMS)]

        def all_running():  # every stream has reached a replica, and the busiest is decoding
            loads = [_load(w) for w in replicas.workers]
            held = sum(x["num_reqs"] + x["num_waiting_reqs"] for x in loads)
            return loads if held == STREAMS and max(x["num_reqs"] for x in loads) > 0 else None

        loads = wait_for(all_running, "the streams to reach the replicas")
        victim = max(range(len(loads)), key=lambda i: (loads[i]["num_reqs"], loads[i]["num_waiting_reqs"]))
        on_victim = loads[victim]["num_reqs"] + loads[victim]["num_waiting_reqs"]
        dead = replicas.workers[victim]
        killed_at = time.monotonic()
        os.kill(dead.pid, signal.SIGKILL)

        def new_request(i: int):
            return client.completions.create(model=MODEL_NAME, prompt=f"Count to {i}:", max_tokens=2)

        new = [pool.submit(new_request, i) for i in range(NEW_REQUESTS)]
        for f in concurrent.futures.as_completed(new, timeout=TIMEOUT_S):
            assert f.result().usage.completion_tokens >= 1  # raises what the client raised
        outcomes = [f.result(timeout=TIMEOUT_S) for f in streams]

    failed = [(o, end - killed_at) for o, _, end in outcomes if o != "done"]
    assert len(failed) == on_victim, outcomes  # exactly the killed replica's streams failed
    for error, after in failed:
        assert isinstance(error, openai.APIConnectionError), repr(error)  # a clean error, not a hang
        assert after < CLEAN_ERROR_S, f"{error!r} came {after:.1f} s after the kill"
    assert all(tokens == STREAM_TOKENS for o, tokens, _ in outcomes if o == "done"), outcomes
    assert dead.proc.wait(TIMEOUT_S) == -signal.SIGKILL
    wait_for(lambda: _router_health(replicas).get(dead.url) is False, "the router to mark the replica unhealthy",
             timeout=CLEAN_ERROR_S, every=0.1)  # fmt: skip


def test_a_dead_replica_is_restarted_and_taken_back(replicas):
    """poll() (what `ringfuse serve --replicas` runs every 0.2 s) restarts the dead replica on
    its port; the router's health check takes it back, and it serves."""
    dead = [w for w in replicas.workers if not w.alive]
    assert len(dead) == 1, "the fault test kills one replica first"
    (event,) = replicas.poll()
    assert "was killed by SIGKILL; restarted it as pid" in event, event
    reborn = next(w for w in replicas.workers if w.name == dead[0].name)
    assert reborn.alive and reborn.pid != dead[0].pid
    wait_for(lambda: reborn.url == dead[0].url and all(_router_health(replicas).values()),
             "the router to take the restarted replica back", timeout=TIMEOUT_S * 2, every=0.1)  # fmt: skip
    assert _client(reborn.url).completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).usage
    assert _client(replicas.url).completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).usage
    assert replicas.poll() == []  # nothing else to do


def test_stopping_leaves_no_process_and_no_shm_segment(replicas):
    pids = replicas.pids()
    assert len(pids) == 4  # two replicas, the restarted one, the router
    replicas.stop()
    assert all(c.proc.returncode is not None for c in replicas.children)  # reaped
    assert not _left_behind(pids)
    assert _shm_segments() <= replicas.shm_before


class _FakeChild:
    """What ReplicaSet.poll uses of a Child, without a process: dead once ``exit_code`` is set."""

    pids = iter(range(10**6, 2 * 10**6))

    def __init__(self, name, argv=(), env=None, log=None, exit_code=None):
        self.name, self.argv, self.pid, self.exit_code = name, list(argv), next(self.pids), exit_code
        self.url = "http://127.0.0.1:1"

    alive = property(lambda self: self.exit_code is None)

    def exit_status(self):
        return f"{self.name} (pid {self.pid}) exited with {self.exit_code}"

    describe_exit = exit_status

    def close(self):
        pass


def test_poll_restarts_a_dead_replica_on_its_port_and_gives_up_on_one_that_keeps_dying(monkeypatch):
    from ringfuse.serve import replicas as module

    rs = ReplicaSet(["--model", "m.gguf"], 2, threads=1, log=None)
    rs.workers = [_FakeChild("replica 0"), _FakeChild("replica 1")]
    rs.router, rs._ports, rs._restarts = _FakeChild("router"), [4001, 4002], [collections.deque(), collections.deque()]
    assert rs.poll() == []
    born = []  # every restart dies at once
    monkeypatch.setattr(module, "Child", lambda *a, **k: born.append(_FakeChild(*a, **k, exit_code=1)) or born[-1])
    rs.workers[1].exit_code = -9
    for attempt in range(module.MAX_RESTARTS):
        (event,) = rs.poll()
        assert f"replica 1 (pid {rs._retired[-1].pid}) exited with" in event and "on port 4002" in event
        assert rs.workers[1] is born[-1] and born[-1].argv[-4:] == ["--port", "4002", "--threads", "1"]
    with pytest.raises(module.ReplicaError, match=f"died {module.MAX_RESTARTS + 1} times within"):
        rs.poll()
    assert rs.workers[0].alive and len(rs.pids()) == 3 + module.MAX_RESTARTS


def test_policy_defaults_and_bad_settings():
    assert ReplicaSet([], 2, threads=1).policy == "power_of_two"
    assert ReplicaSet([], 1, threads=1).policy == "round_robin"  # the router refuses power_of_two for one
    assert ReplicaSet([], 4).threads == max(1, len(os.sched_getaffinity(0)) // 4)
    for kwargs, says in (({"replicas": 0}, "replicas must be an int >= 1, got 0"),
                         ({"replicas": 1, "policy": "power_of_two"}, "needs replicas >= 2"),
                         ({"replicas": 2, "policy": "random"}, "policy must be one of"),
                         ({"replicas": 2, "threads": 0}, "threads must be an int >= 1 or None, got 0")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(says)):
            ReplicaSet([], **kwargs)


def test_poll_says_when_the_router_died():
    from ringfuse.serve.replicas import ReplicaError

    rs = ReplicaSet(["--model", "m.gguf"], 1, threads=1, log=None)
    rs.workers, rs.router = [_FakeChild("replica 0")], _FakeChild("router", exit_code=1)
    with pytest.raises(ReplicaError, match=r"router \(pid \d+\) exited with 1"):
        rs.poll()


def test_a_replica_that_fails_to_load_stops_the_start_with_its_output(tmp_path):
    """start() gives up as soon as a child exits, says which and what it printed, and leaves
    no process behind."""
    from ringfuse.serve.replicas import ReplicaError

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    rs = ReplicaSet(["--model", str(bad), *WORKER_FLAGS], 1, threads=1, port=0, log=None)
    with pytest.raises(ReplicaError) as e:
        rs.start(timeout=TIMEOUT_S * 2)
    message = str(e.value)
    assert "replica 0 (pid" in message and "exited with 1" in message, message
    assert "the model failed to load" in message, message
    assert not _left_behind(rs.pids())


def test_the_command_serves_through_the_router_and_leaves_nothing_on_sigterm(gguf_path):
    shm_before = _shm_segments()
    with ServeProcess("--replicas", "2", "--threads", "1", "--port", "0", "--model", str(gguf_path),
                      *WORKER_FLAGS[2:], "--served-model-name", "smol", "--api-key", API_KEY) as server:  # fmt: skip
        ready = server.line_matching(r"^ringfuse serve: ready: serving 'smol' on (http://\S+) \((.*)\)$")
        pids = [int(p) for p in re.findall(r"pid (\d+)", ready.group(2))]
        assert len(pids) == 3, ready.group(0)  # the router and two replicas
        out = _client(ready.group(1)).completions.create(model="smol", prompt="Hi", max_tokens=3,
                                                          extra_body={"ignore_eos": True})  # fmt: skip
        assert out.usage.completion_tokens == 3
        assert API_KEY not in " ".join(_command_lines(pids))  # the key went through the environment
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT_S) == 0, "".join(server.stderr)
        server.line_matching(r"^ringfuse serve: stopping$")
        assert "Traceback" not in "".join(server.stderr), "".join(server.stderr)
    assert not _left_behind([server.proc.pid, *pids])
    assert _shm_segments() <= shm_before
    with pytest.raises(httpx.ConnectError):  # the router's port is closed
        httpx.get(f"{ready.group(1)}/health", timeout=5)
