"""Refusals in OpenAI's error shape, {"error": {"message", "type", "param", "code"}}: bad
parameters, wrong types, malformed JSON, oversized bodies, prompts longer than the context,
unknown models and routes, auth, and 500s that leak nothing; and unknown fields, which are
ignored (logged once), as vLLM does."""

import json

import openai
import pytest

from .conftest import CHAT_PROMPT, COMPLETION_PROMPT, MAX_MODEL_LEN, MODEL_NAME, TIMEOUT_S, serving, wait_for

CHAT = [{"role": "user", "content": CHAT_PROMPT}]


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("field,value,param,says", [
    ("max_tokens", "8", "max_tokens", "must be an integer, got string '8'"),
    ("max_tokens", 8.0, "max_tokens", "must be an integer"),
    ("max_tokens", True, "max_tokens", "must be an integer, got boolean"),
    ("max_tokens", 0, "max_tokens", "must be >= 1"),
    ("temperature", "hot", "temperature", "must be a number"),
    ("temperature", -1, "temperature", "temperature must be in [0.0, inf)"),
    ("top_p", 0, "top_p", "top_p must be in (0.0, 1.0]"),
    ("top_k", -2, "top_k", "must be >= 0"),
    ("n", 0, "n", "must be in [1, 128]"),
    ("seed", -1, "seed", "seed must be in [0, 2**64)"),
    ("stop", 3, "stop", "must be a string or an array of strings"),
    ("stop", [""], "stop", "non-empty strings"),
    ("repetition_penalty", 0, "repetition_penalty", "repetition_penalty must be in (0.0, inf)"),
    ("stream_options", {"include_usage": True}, "stream_options", "only allowed with \"stream\": true"),
    ("top_logprobs", 2, "top_logprobs", "needs \"logprobs\": true"),
    ("presence_penalty", 0.5, "presence_penalty", "not supported"),
    ("tools", [{"type": "function"}], "tools", "not supported"),
    ("functions", [{"name": "get_weather", "parameters": {}}], "functions", "not supported"),
    ("function_call", "auto", "function_call", "not supported"),
    ("modalities", ["text", "audio"], "modalities", "not supported"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio", "not supported"),
    ("min_p", 0.1, "min_p", "not supported"),
    ("min_tokens", 5, "min_tokens", "not supported"),
    ("stop_token_ids", [2], "stop_token_ids", "not supported"),
    ("include_stop_str_in_output", True, "include_stop_str_in_output", "not supported"),
    ("functions", [], None, None),  # the no-op values are fine
    ("modalities", ["text"], None, None),
    ("min_p", 0, None, None),
    ("messages", "hi", "messages", "must be an array of {\"role\", \"content\"} objects, got string"),
    ("messages", [], "messages", "at least one message"),
    ("messages", [{"role": "user"}], None, None),  # content null: an empty message, fine
    ("messages", [{"role": "user", "content": 5}], "messages.0.content", "must be a string, an array"),
    ("messages", [{"role": "assistant", "content": "Hi.", "refusal": None, "tool_calls": None},
                  {"role": "user", "content": [{"type": "text", "text": "Go on."}]}], None, None),  # as clients echo
    ("messages", [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "messages.0.tool_calls",
     "not supported"),
    ("stop", None, None, None),  # as GuideLLM sends it
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage", "must be a boolean, got string"),
    ("logprobs", 1, "logprobs", "must be a boolean, got integer 1"),  # a known field: still typed
    ("frobnicate", 1, None, None),  # unknown: ignored (test_unknown_fields_are_ignored_and_logged_once)
])  # fmt: skip
def test_bad_chat_fields_are_400_naming_the_field(server, field, value, param, says):
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 2, "temperature": 0, field: value}
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    if says is None:
        assert r.status_code == 200, r.text
        return
    err = _error(r, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert says in err["message"], err["message"]


@pytest.mark.parametrize("field,value,param,says", [
    ("prompt", [], "prompt", "must not be empty"),
    ("prompt", [[]], "prompt", "at least one token"),
    ("prompt", [1, "a"], "prompt", "must be a string, an array of strings, an array of token ids"),
    ("prompt", [10**9], "prompt", "must be in [0, 49152)"),
    ("logprobs", 21, "logprobs", "must be in [0, 20]"),
    ("echo", True, "echo", "not supported"),
    ("echo", "no", "echo", "must be a boolean, got string 'no'"),
    ("stop", [1], "stop", "must be a string or an array of strings"),
    ("best_of", 3, "best_of", "must be in [1, 1]"),
    ("stop_token_ids", [2], "stop_token_ids", "not supported"),
    ("min_tokens", 1, "min_tokens", "not supported"),
])  # fmt: skip
def test_bad_completion_fields_are_400(server, field, value, param, says):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, field: value}
    with server.http() as http:
        err = _error(http.post("/v1/completions", json=body), 400)
    assert err["param"] == param and says in err["message"], err


# what sglang-router adds to every body it forwards (chat: also the last three), and what
# GuideLLM and vLLM clients send; names this server does not know
ROUTER_FIELDS = {"no_stop_trim": False, "skip_special_tokens": True, "return_hidden_states": False,
                 "continue_final_message": False, "separate_reasoning": True, "stream_reasoning": True,
                 "include_reasoning": True}  # fmt: skip


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ringfuse.serve" and r.levelname == "WARNING"]


def test_unknown_fields_are_ignored_and_logged_once(server, offline, caplog, monkeypatch):
    """Unknown fields, top-level and nested, change nothing: the answer is the one without
    them. Their names are logged once each (a warning), not on every request."""
    from ringfuse.serve import protocol

    monkeypatch.setattr(protocol, "_logged_names", set())
    body = {"model": MODEL_NAME, "messages": [dict(CHAT[0], reasoning_content=None)], "max_tokens": 8,
            "temperature": 0, "stop": None, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **ROUTER_FIELDS}  # fmt: skip
    caplog.set_level("DEBUG", logger="ringfuse.serve")
    with server.http() as http:
        for attempt in range(2):
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            assert text == offline["chat"].text
            assert chunks[-1]["usage"]["completion_tokens"] == len(offline["chat"].token_ids)
            warned = _warnings(caplog)
            assert len(warned) == 1, warned  # the second request logs nothing new
        for name in [*ROUTER_FIELDS, "messages.*.reasoning_content", "stream_options.continuous_usage_stats"]:
            assert name in warned[0], (name, warned[0])
        # a completion with the router's fields (echo false among them: a known field at its no-op value)
        r = http.post("/v1/completions", json={"prompt": COMPLETION_PROMPT, "max_tokens": 8, "temperature": 0,
                                               "echo": False, "frobnicate": {"x": 1}, **ROUTER_FIELDS})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline["completion"].text
        warned = _warnings(caplog)
        assert len(warned) == 2 and "frobnicate" in warned[1] and "no_stop_trim" not in warned[1], warned


def test_ignored_names_logged_are_bounded(monkeypatch, caplog):
    """A client inventing field names cannot grow the set of logged names without bound."""
    from ringfuse.serve import protocol

    monkeypatch.setattr(protocol, "_logged_names", set())
    monkeypatch.setattr(protocol, "MAX_LOGGED_NAMES", 3)
    caplog.set_level("DEBUG", logger="ringfuse.serve")
    protocol.parse(protocol.DetokenizeRequest, {"tokens": [1], "a": 1, "b": 2})
    protocol.parse(protocol.DetokenizeRequest, {"tokens": [1], "c": 1, "d": 2})
    assert protocol._logged_names == {"a", "b", "c"}
    levels = [(rec.levelname, rec.getMessage()) for rec in caplog.records if rec.name == "ringfuse.serve"]
    assert [lvl for lvl, _ in levels] == ["WARNING", "WARNING", "DEBUG"] and levels[2][1].endswith(": d"), levels


def test_a_client_that_leaves_while_sending_its_body_is_no_server_error(server, caplog):
    """A body cut short by the client (Content-Length 100, 10 bytes sent, socket closed) was
    logged as an ERROR with a ClientDisconnect traceback, once per such connection."""
    import socket
    from urllib.parse import urlsplit

    caplog.set_level("DEBUG", logger="ringfuse.serve")
    where = urlsplit(server.url)
    for _ in range(3):
        with socket.create_connection((where.hostname, where.port), timeout=TIMEOUT_S) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
    with server.http() as http:  # still serving; and by now the three connections were handled
        wait_for(lambda: sum("the client disconnected" in r.getMessage() for r in caplog.records) == 3,
                 "the disconnects to be handled")
        assert http.get("/health").status_code == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def test_text_that_is_not_unicode_is_400(server):
    """JSON can spell a lone surrogate (\\ud800), which no UTF-8 text holds."""
    with server.http() as http:
        for path, body in (("/v1/completions", b'{"prompt": "a\\ud800", "max_tokens": 1}'),
                           ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}')):
            err = _error(http.post(path, content=body), 400)
            assert "lone surrogate" in err["message"], err


def test_prompt_longer_than_the_context_is_400(server):
    with server.http() as http:
        err = _error(http.post("/v1/completions", json={"prompt": [1] * MAX_MODEL_LEN, "max_tokens": 1}), 400)
        assert err["code"] == "context_length_exceeded" and f"at most {MAX_MODEL_LEN} tokens" in err["message"]
        fits = MAX_MODEL_LEN - 10
        err = _error(http.post("/v1/completions", json={"prompt": [1] * fits, "max_tokens": 11}), 400)
        assert err["code"] == "context_length_exceeded" and "+ 11 new tokens" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the client sees it as such
        server.openai().chat.completions.create(model=MODEL_NAME, max_tokens=1,
                                                messages=[{"role": "user", "content": "word " * MAX_MODEL_LEN}])
    assert e.value.code == "context_length_exceeded"


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.openai().chat.completions.create(model="gpt-17", messages=CHAT, max_tokens=1)
    assert e.value.code == "model_not_found" and MODEL_NAME in e.value.message


@pytest.mark.parametrize("body,says", [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got array"),
    (b"[" * 100_000, "not valid JSON"),  # nested past the parser's recursion limit
])  # fmt: skip
def test_malformed_json_is_400(server, body, says):
    with server.http() as http:
        err = _error(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and says in err["message"]


def test_missing_required_field_is_400(server):
    with server.http() as http:
        err = _error(http.post("/v1/completions", json={"max_tokens": 1}), 400)
    assert err["param"] == "prompt" and "required" in err["message"]


def test_oversized_bodies_are_413(llm, offline):
    limit = 64 << 10
    with serving(llm, max_body_bytes=limit) as served, served.http() as http:
        big = {"prompt": "x" * limit, "max_tokens": 1}
        err = _error(http.post("/v1/completions", json=big), 413)  # refused from its Content-Length
        assert err["code"] == "request_too_large" and str(limit) in err["message"]

        def chunks():  # no Content-Length: refused once the limit is read
            for _ in range(4):
                yield b" " * (limit // 2)

        err = _error(http.post("/v1/completions", content=chunks()), 413)
        assert "more than" in err["message"]
        ok = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert ok.status_code == 200, ok.text  # and the server goes on


def test_unknown_route_and_wrong_method(server):
    with server.http() as http:
        err = _error(http.get("/v1/nothing"), 404)
        assert err["code"] == "not_found" and "/v1/nothing" in err["message"]
        err = _error(http.get("/v1/completions"), 405)
        assert err["code"] == "method_not_allowed"


def test_an_internal_error_is_a_500_that_leaks_nothing(server, llm, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(llm.tokenizer, "encode_chat", broken)
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1})
        err = _error(r, 500)
        assert err["type"] == "server_error"
        assert "secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
        monkeypatch.undo()
        assert http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "Tell me a story.", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
    ("/tokenize", {"prompt": "Tell me a story."}),
])  # fmt: skip
def test_tokenizing_does_not_hold_the_event_loop(server, llm, monkeypatch, route, body):
    """A multi-MB prompt took seconds to tokenize on the event loop, and every stream and
    /health waited for it. Here the tokenizer blocks until /health has answered: that can
    only happen if tokenizing runs off the loop."""
    import threading

    answered, entered = threading.Event(), threading.Event()
    tok = llm.tokenizer
    for name in ("encode", "encode_chat"):
        real = getattr(tok, name)

        def blocked(*args, _real=real, **kwargs):
            entered.set()
            answered.wait(timeout=30)
            return _real(*args, **kwargs)

        monkeypatch.setattr(tok, name, blocked)
    result = {}

    def send():
        with server.http() as http:
            result["status"] = http.post(route, json=body).status_code

    sender = threading.Thread(target=send)
    sender.start()
    assert entered.wait(timeout=30)
    with server.http() as http:
        assert http.get("/health", timeout=10).status_code == 200  # the loop is free while tokenizing
    answered.set()
    sender.join(timeout=60)
    assert result == {"status": 200}


@pytest.mark.parametrize("key", ["clé", "tab\tkey"])
def test_api_key_must_be_printable_ascii(key):
    """Header values arrive as Latin-1 and clients send ASCII: a UTF-8 key could never match."""
    from ringfuse.serve.app import ServeSettings

    with pytest.raises(ValueError, match="api_key must be printable ASCII"):
        ServeSettings(model_name="m", api_key=key)


def test_api_key(llm, offline):
    """With an API key, the API routes need `Authorization: Bearer <key>` (compared in
    constant time); the probes and the metrics stay open."""
    with serving(llm, api_key="sesame") as served:
        with pytest.raises(openai.AuthenticationError):
            served.openai(api_key="wrong").models.list()
        assert [m.id for m in served.openai(api_key="sesame").models.list().data] == [MODEL_NAME]
        with served.http() as http:
            for path in ("/v1/models", "/tokenize"):
                err = _error(http.request("GET" if path == "/v1/models" else "POST", path, json={"prompt": "x"}), 401)
                assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            r = http.post("/v1/completions", json={"prompt": "Hi"}, headers={"Authorization": "Basic sesame"})
            assert _error(r, 401) and r.headers["www-authenticate"] == "Bearer"
            r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                          headers={"Authorization": "Bearer sesame"})  # fmt: skip
            assert r.status_code == 200, r.text
            for path in ("/health", "/ready", "/metrics"):
                assert http.get(path).status_code == 200, path
