"""`torchrun --nproc-per-node 2 -m ringfuse serve --tp 2` as a user runs it: rank 0 serves,
rank 1 follows it step by step. Through the openai client it answers as one rank does (greedy,
fp32: the same tokens); concurrent streams, a client gone mid-stream and an idle spell past
the ranks' timeout leave the ranks in step; SIGTERM lets the streams in flight finish and
stops everything. Faults: rank 1 SIGKILLed under load (the streams end with a clean error at
once, the job exits non-zero) and rank 0 SIGKILLed (rank 1 says so and exits). Nothing is
left behind: no process, no /dev/shm segment. Every wait is bounded."""

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
import time

import httpx
import openai
import pytest

from tests.distributed.harness import free_port

from .conftest import (CHAT_PROMPT, COMPLETION_PROMPT, MAX_BATCH, MAX_MODEL_LEN, MODEL_NAME, TIMEOUT_S,
                       wait_for)  # fmt: skip
from .test_cli import ServeProcess
from .test_engine_loop import _metrics
from .test_replicas import _left_behind, _shm_segments

TP_TIMEOUT_S = 10  # --tp-timeout: the heartbeat is every 2.5 s; the idle test waits past it
CLEAN_ERROR_S = 10.0  # a fault's error must reach the clients (or the log) within this
STREAM_TOKENS = 48
LONG_TOKENS = MAX_MODEL_LEN - 32  # a stream still decoding when its rank is killed


class TorchrunServer(ServeProcess):
    """The command on 127.0.0.1:<free port>, one thread per rank, once both ranks are up."""

    def __init__(self, gguf_path):
        # --log-dir: without it torchrun leaves an empty /tmp/torchelastic_* tree behind per run
        self.log_dir = tempfile.mkdtemp(prefix="ringfuse-torchrun-")
        launcher = ("torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                    "--log-dir", self.log_dir, "-m")  # fmt: skip
        super().__init__("--tp", "2", "--tp-timeout", str(TP_TIMEOUT_S), "--model", str(gguf_path), "--port", "0",
                         "--threads", "1", "--served-model-name", MODEL_NAME, "--max-model-len", str(MAX_MODEL_LEN),
                         "--max-batch", str(MAX_BATCH), "--log-level", "warning", launcher=launcher)  # fmt: skip
        self.shm_before, self.ranks = _shm_segments(), []
        try:
            self.url = self.line_matching(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
            self.ranks = _children(self.proc.pid)  # rank 0 listens: both are started
            self.follower = int(self.wait_log(r"\(rank 1/2\): model loaded \(pid (\d+)\)").group(1))
            self.wait_log(r"ready: serving .* \(tensor-parallel over 2 ranks\)")
            assert len(self.ranks) == 2 and self.follower in self.ranks, (self.ranks, self.follower)
            self.leader = next(pid for pid in self.ranks if pid != self.follower)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        """Kill torchrun and the ranks, each of which leads a process group of its own."""
        for pid in {*self.ranks, *_children(self.proc.pid)}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        super().__exit__(*exc)
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def wait_log(self, pattern: str) -> re.Match:
        """The first match of ``pattern`` in the log so far, waiting for it (the ranks share
        stderr, so their lines come in either order)."""

        def found():
            closed = self.stderr_closed.is_set()  # before reading the log: then it has every line
            match = re.search(pattern, self.log())
            if match is None and closed:
                raise AssertionError(f"torchrun exited ({self.proc.returncode}) without {pattern!r}:\n{self.log()}")
            return match

        return wait_for(found, repr(pattern), every=0.05)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)

    def left_behind(self) -> list[str]:
        return _left_behind([self.proc.pid, *self.ranks])

    def log(self) -> str:
        return "".join(self.stderr)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def _stream(client, prompt: str, tokens: int = STREAM_TOKENS, first=None):
    """(outcome, text, time.monotonic() at the end) of a greedy stream: 'done' or the exception.
    ``first``: an Event set at its first token."""
    text = []
    try:
        for chunk in client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=tokens, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):  # fmt: skip
            text.append(chunk.choices[0].text)
            if first is not None:
                first.set()
        return "done", "".join(text), time.monotonic()
    except Exception as e:  # noqa: BLE001 (what the client raised is what is checked)
        return e, "".join(text), time.monotonic()


@pytest.fixture(scope="module")
def tp_server(gguf_path):
    with TorchrunServer(gguf_path) as server:
        yield server


def test_it_answers_as_one_rank_does(tp_server, offline):
    client = tp_server.client()
    out = client.completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text == offline["completion"].text and out.usage.completion_tokens == 8
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": CHAT_PROMPT}])  # fmt: skip
    assert chat.choices[0].message.content == offline["chat"].text
    info = httpx.get(f"{tp_server.url}/server_info", timeout=TIMEOUT_S).json()
    assert info["tp_size"] == 2 and info["max_running_requests"] == MAX_BATCH


def test_concurrent_streams_and_a_client_gone_keep_the_ranks_in_step(tp_server, offline):
    """Three streams on a batch of two (one waits), and a client that leaves after its first
    token: the others complete in full, every block comes back, and the next greedy answer
    is still one rank's (ranks out of step would fail their next collective instead)."""
    client = tp_server.client()
    with httpx.Client(base_url=tp_server.url, timeout=TIMEOUT_S) as probe:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(_stream, client, f"Tell story number {i}:") for i in range(3)]
            with probe.stream("POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": "Count to ten:",
                                                               "max_tokens": 200, "stream": True}) as gone:  # fmt: skip
                next(line for line in gone.iter_lines() if line.startswith("data: {"))
            outcomes = [f.result(timeout=TIMEOUT_S) for f in streams]
        assert [o for o, _, _ in outcomes] == ["done"] * 3, outcomes
        wait_for(lambda: _metrics(probe)["ringfuse:num_requests_running"] == 0, "the batch to drain")
        seen = _metrics(probe)
        assert seen["ringfuse:kv_cache_usage_perc"] == 0 and seen["ringfuse:request_success_total/abort"] == 1
    out = client.completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text == offline["completion"].text


def test_an_idle_spell_past_the_timeout_keeps_serving(tp_server, offline):
    """Idle, rank 0 beats: rank 1's wait for it does not run out (it would after TP_TIMEOUT_S)."""
    time.sleep(TP_TIMEOUT_S + 2)
    out = tp_server.client().completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, max_tokens=8,
                                                temperature=0)  # fmt: skip
    assert out.choices[0].text == offline["completion"].text
    assert tp_server.proc.poll() is None


def test_sigterm_lets_the_streams_in_flight_finish_and_leaves_nothing(tp_server):
    """SIGTERM to torchrun, which relays it to both ranks: rank 0 shuts down gracefully (the
    stream in flight ends in full), rank 1 follows until rank 0's STOP; everything exits."""
    first = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = pool.submit(_stream, tp_server.client(), "Tell a story:", STREAM_TOKENS, first)
        assert first.wait(TIMEOUT_S)
        tp_server.proc.send_signal(signal.SIGTERM)
        outcome, text, _ = stream.result(timeout=TIMEOUT_S)
    assert outcome == "done" and text, outcome
    assert tp_server.proc.wait(TIMEOUT_S) != 0  # torchrun reports the signal
    tp_server.wait_log(r"\(rank 1/2\): stopped \(signalled\)")
    assert not re.search(r"ringfuse serve.*error", tp_server.log()), tp_server.log()
    assert not tp_server.left_behind()
    assert _shm_segments() <= tp_server.shm_before


def test_rank_1_killed_under_load(gguf_path):
    """Two streams decoding; SIGKILL rank 1: rank 0's next collective fails at once, both streams
    end with a clean error (no hang, no traceback to the client), the job exits non-zero."""
    with TorchrunServer(gguf_path) as server:
        client = server.client()
        firsts = [threading.Event() for _ in range(2)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(_stream, client, f"Tell story number {i}:", LONG_TOKENS, firsts[i])
                       for i in range(2)]  # fmt: skip
            assert all(f.wait(TIMEOUT_S) for f in firsts)
            killed_at = time.monotonic()
            os.kill(server.follower, signal.SIGKILL)
            outcomes = [f.result(timeout=TIMEOUT_S) for f in streams]
        for error, _, end in outcomes:
            assert isinstance(error, openai.APIError), repr(error)
            assert "the engine has stopped" in str(error) and "Traceback" not in str(error)
            assert end - killed_at < CLEAN_ERROR_S
        assert server.proc.wait(TIMEOUT_S) != 0
        assert "ringfuse serve: error: " in server.log()
        assert not server.left_behind()
        assert _shm_segments() <= server.shm_before


def test_rank_0_killed(gguf_path):
    """SIGKILL rank 0: rank 1's wait fails when its socket closes; it says so and exits."""
    with TorchrunServer(gguf_path) as server:
        killed_at = time.monotonic()
        os.kill(server.leader, signal.SIGKILL)
        server.wait_log(r"\(rank 1/2\): error: stopped following rank 0: ")
        assert time.monotonic() - killed_at < CLEAN_ERROR_S
        assert server.proc.wait(TIMEOUT_S) != 0
        assert not server.left_behind()
        assert _shm_segments() <= server.shm_before
