"""Fixtures of the serve tests: one engine (the default model, a short context) shared by
servers started for real on 127.0.0.1 (uvicorn in a thread, on a socket bound to a free
port, always shut down), and the offline LLM.generate results they are compared against.

The offline results are computed before any server starts: while one runs, its engine
thread owns the LLM."""

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

os.environ.setdefault("RINGFUSE_WEIGHT_CACHE", "0")  # as tests/runtime: no ~1 GB of cache files per run

from ringfuse.runtime import LLM  # noqa: E402
from ringfuse.serve.app import ServeSettings, create_app  # noqa: E402
from ringfuse.serve.server import bind, url_of  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 384
MAX_BATCH = 2
TIMEOUT_S = 60  # the most any one request, start-up or wait of these tests may take

# prompts and settings the offline references and the server tests share
COMPLETION_PROMPT = "The capital of France is"
SECOND_PROMPT = "Hello, my name is"
CHAT_PROMPT = "What is the capital of France?"
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9, seed=7)
PENALIZED_PROMPT = "one two one two one two one two"


def wait_for(condition, what: str, timeout: float = TIMEOUT_S, every: float = 0.01):
    """Poll ``condition()`` until it returns a truthy value (returned), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@dataclasses.dataclass
class Served:
    url: str
    app: object
    ready: threading.Event
    dead: list  # (message, while_loading) from on_dead

    @property
    def engine(self):
        return self.app.state.engine

    def openai(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=TIMEOUT_S, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT_S, **kw)


@contextlib.contextmanager
def serving(llm, make_llm=None, wait_ready: bool = True, **settings):
    """A real server on 127.0.0.1:<free port> over ``llm`` (or what ``make_llm`` returns);
    shut down and joined on exit, whatever happened."""
    ready, dead = threading.Event(), []
    app = create_app(make_llm or (lambda: llm), ServeSettings(model_name=MODEL_NAME, **settings), on_ready=ready.set,
                     on_dead=lambda message, while_loading: dead.append((message, while_loading)))  # fmt: skip
    sock = bind("127.0.0.1", 0)  # listening before uvicorn starts: clients can connect at once
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        if wait_ready:
            assert ready.wait(TIMEOUT_S), f"the server did not get ready: {dead}"
        yield Served(url_of(sock), app, ready, dead)
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    override = os.environ.get("RINGFUSE_TEST_GGUF")
    if override:
        return Path(override)
    from ringfuse.runtime.model_files import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llm(gguf_path):
    return LLM(gguf_path, max_batch=MAX_BATCH, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def offline(llm):
    """LLM.generate's results for what the server tests send (greedy unless said)."""
    ref = {
        "completion": llm.generate(COMPLETION_PROMPT, raw=True, max_new_tokens=8, logprobs=3)[0],
        "second": llm.generate(SECOND_PROMPT, raw=True, max_new_tokens=6)[0],
        "chat": llm.generate(CHAT_PROMPT, max_new_tokens=8, logprobs=2)[0],
        "sampled": llm.generate(CHAT_PROMPT, max_new_tokens=8, **SAMPLED)[0],
        "sampled_choice_1": llm.generate(CHAT_PROMPT, max_new_tokens=8, **dict(SAMPLED, seed=SAMPLED["seed"] + 1))[0],
        "penalized": llm.generate(PENALIZED_PROMPT, raw=True, max_new_tokens=8, repetition_penalty=1.5)[0],
    }
    assert not llm.has_unfinished()
    return ref


@pytest.fixture(scope="module")
def server(llm, offline):
    """The shared server (default settings) of a test module."""
    with serving(llm) as served:
        yield served
    assert not llm.has_unfinished()
