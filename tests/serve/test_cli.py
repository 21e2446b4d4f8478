"""`ringfuse serve` as a user runs it: a real process on 127.0.0.1 (port 0: a free one),
probes, one request through the openai client, SIGTERM; a model that fails to load; bad
flags; and the message when the serve extra is missing."""

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from ringfuse import cli

from .conftest import TIMEOUT_S, wait_for


class ServeProcess:
    """`python -m ringfuse serve ARGS` in its own session (``launcher``: a module and its
    arguments to run it under, e.g. torchrun's ending in -m), its stderr read line by line on
    a thread; its process group is killed on exit if it is still running."""

    def __init__(self, *args: str, launcher: tuple[str, ...] = ()):
        env = dict(os.environ, RINGFUSE_WEIGHT_CACHE="0", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", *launcher, "ringfuse", "serve", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)  # fmt: skip
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self.stderr_closed = threading.Event()  # every line is in self.stderr
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)
        self.stderr_closed.set()

    def line_matching(self, pattern: str) -> re.Match:
        while True:
            line = self.lines.get(timeout=TIMEOUT_S)
            if line is None:
                raise AssertionError(f"the server exited ({self.proc.wait()}) without printing {pattern!r}:\n"
                                     + "".join(self.stderr))  # fmt: skip
            match = re.search(pattern, line)
            if match:
                return match

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(TIMEOUT_S)


def test_serve_starts_answers_and_stops_on_sigterm(gguf_path):
    with ServeProcess("--model", str(gguf_path), "--port", "0", "--max-model-len", "256", "--max-batch", "2",
                      "--served-model-name", "smol") as server:  # fmt: skip
        url = server.line_matching(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            assert http.get("/health").status_code == 200  # answered while the model loads

            def ready():
                if server.proc.poll() is not None:
                    raise AssertionError("".join(server.stderr))
                return http.get("/ready").status_code == 200

            wait_for(ready, "/ready", timeout=120)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
            out = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=3,
                                            temperature=0)  # fmt: skip
            assert out.usage.completion_tokens == 3 and out.choices[0].text
        server.line_matching(r"ready: serving 'smol'")
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(TIMEOUT_S)
        assert code in (0, -signal.SIGTERM), "".join(server.stderr)  # uvicorn re-raises the signal it shut down for
        assert "Traceback" not in "".join(server.stderr)
        with pytest.raises(httpx.ConnectError):  # the port is closed
            httpx.get(f"{url}/health", timeout=5)


def test_sigterm_ends_requests_still_open_after_the_grace_period_with_a_503(gguf_path):
    """Requests that outlive the 5 s grace get the engine's 503 'the server is shutting down':
    a JSON error, or an error event and [DONE] in a stream. Before, uvicorn cancelled them at
    its timeout: a plain-text 500, a stream cut short, a CancelledError traceback in the log."""
    with ServeProcess("--model", str(gguf_path), "--port", "0", "--max-model-len", "2048", "--max-batch", "1",
                      "--threads", "1") as server:  # fmt: skip
        url = server.line_matching(r"ready: serving '[^']+' on (http://127\.0\.0\.1:\d+)").group(1)
        body = {"prompt": "Hi", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
        got, events = {}, []

        def json_request():  # queued behind the stream (one sequence at a time)
            got["json"] = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S)

        def stream_request():
            with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True), timeout=TIMEOUT_S) as r:
                events.extend(line for line in r.iter_lines() if line)

        threads = [threading.Thread(target=f) for f in (stream_request, json_request)]
        threads[0].start()  # the stream decodes first, so the JSON request waits in the queue
        wait_for(lambda: len(events) >= 3 or server.proc.poll() is not None, "a streaming request")
        threads[1].start()
        wait_for(lambda: _waiting(url) == 1, "the JSON request in the queue")
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(TIMEOUT_S)
        code = server.proc.wait(TIMEOUT_S)
    assert code in (0, -signal.SIGTERM), "".join(server.stderr)
    assert "Traceback" not in "".join(server.stderr)
    reply = got["json"]
    assert reply.status_code == 503 and "the server is shutting down" in reply.json()["error"]["message"]
    assert events[-1] == "data: [DONE]" and "the server is shutting down" in events[-2], events[-3:]


def _waiting(url) -> int:
    """Sequences waiting for a batch slot, from the server's metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=TIMEOUT_S).text.splitlines():
        if line.startswith("ringfuse:num_requests_waiting"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("no ringfuse:num_requests_waiting in /metrics")


def test_a_model_that_fails_to_load_exits_1(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    with ServeProcess("--model", str(bad), "--port", "0") as server:
        assert server.proc.wait(TIMEOUT_S * 2) == 1
        server.line_matching(r"ringfuse serve: error: the model failed to load: ")


@pytest.mark.parametrize("args,says", [
    (["--max-waiting", "0"], "--max-waiting must be >= 1, got 0"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--model", "/nonexistent/model.gguf"], "no such file or folder"),
    (["--api-key", " "], "--api-key must not be blank"),
    (["--quant", "int4"], "invalid choice"),
    (["--tp", "2"], "--tp 2 needs one process per rank: torchrun --nproc-per-node 2 -m ringfuse serve --tp 2"),
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--tp-timeout", "0"], "--tp-timeout must be in [0.1, 86400] seconds, got 0.0"),
    (["--tp-timeout", "nan"], "--tp-timeout must be in [0.1, 86400] seconds, got nan"),
    (["--tp", "2", "--replicas", "2"], "--tp and --replicas together are not supported"),
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--policy", "round_robin"], "--policy needs --replicas"),
    (["--router-metrics-port", "9000"], "--router-metrics-port needs --replicas"),
    (["--replicas", "2", "--router-metrics-port", "0"], "--router-metrics-port must be in [1, 65535], got 0"),
    (["--replicas", "2", "--policy", "random"], "invalid choice"),
    (["--replicas", "1", "--policy", "power_of_two"], "--policy power_of_two needs --replicas >= 2"),
])  # fmt: skip
def test_bad_flags_are_clear_errors(capsys, args, says):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *args])
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("tp", [None, "3"])
def test_under_torchrun_tp_must_match_the_processes(capsys, monkeypatch, tp):
    """torchrun with 2 processes and no --tp (or another) would start servers on one port: refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *(["--tp", tp] if tp else [])])
    assert e.value.code == 2
    assert f"torchrun started 2 processes (WORLD_SIZE=2) but --tp is {tp or 1}: give --tp 2" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--replicas", "2"]])  # with replicas: said before any model loads
def test_a_busy_port_is_a_clear_error(capsys, extra):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port), *extra]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_replicas_without_sglang_router_say_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang_router", None)  # as if not installed: find_spec says None
    assert cli.main(["serve", "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert "--replicas needs sglang-router, which is not installed" in err and "pip install" in err


def test_without_the_serve_extra_it_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: find_spec says None
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ringfuse[serve]'" in err and "missing: fastapi, uvicorn" in err
