"""The OpenAI-compatible API through the official `openai` client and raw HTTP (httpx):
completions and chat (JSON and SSE), sampling parameters, logprobs, usage, models,
tokenize / detokenize and the metrics, compared with offline LLM.generate."""

import json
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (CHAT_PROMPT, COMPLETION_PROMPT, MAX_MODEL_LEN, MODEL_NAME, PENALIZED_PROMPT, SAMPLED,
                       SECOND_PROMPT)  # fmt: skip

CHAT = [{"role": "user", "content": CHAT_PROMPT}]


def test_models_lists_the_served_model(server):
    models = server.openai().models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    raw = server.http().get("/v1/models").json()["data"][0]
    assert raw["max_model_len"] == MAX_MODEL_LEN and raw["owned_by"] == "ringfuse"


def test_completion_greedy_matches_offline(server, offline):
    want = offline["completion"]
    out = server.openai().completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert choice.text == want.text and choice.finish_reason == "length"
    assert out.object == "text_completion" and out.model == MODEL_NAME and out.id.startswith("cmpl-")
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_chat_greedy_matches_offline(server, offline):
    """The chat template is applied as `ringfuse generate` applies it: same prompt tokens,
    same greedy answer."""
    want = offline["chat"]
    out = server.openai().chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == len(want.prompt_token_ids) and out.usage.completion_tokens == len(want.token_ids)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")


def test_seeded_sampling_matches_offline_and_n_choices_use_successive_seeds(server, offline):
    openai_fields = {k: v for k, v in SAMPLED.items() if k != "top_k"}  # top_k is vLLM's: the client's extra_body
    out = server.openai().chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, n=2,
                                                  extra_body={"top_k": SAMPLED["top_k"]}, **openai_fields)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == offline["sampled"].text
    assert out.choices[1].message.content == offline["sampled_choice_1"].text
    assert out.usage.prompt_tokens == len(offline["sampled"].prompt_token_ids)  # once, not once per choice


def test_several_prompts_times_n(server, offline):
    """Choice index = prompt * n + j; greedy choices of one prompt are equal."""
    out = server.openai().completions.create(model=MODEL_NAME, prompt=[COMPLETION_PROMPT, SECOND_PROMPT],
                                             max_tokens=6, temperature=0, n=2)  # fmt: skip
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1] == offline["completion"].text[: len(texts[0])]
    assert texts[2] == texts[3] == offline["second"].text
    want = len(offline["completion"].prompt_token_ids) + len(offline["second"].prompt_token_ids)
    assert out.usage.prompt_tokens == want and out.usage.completion_tokens == 4 * 6


def test_token_id_prompt_equals_text_prompt(server, offline):
    want = offline["completion"]
    out = server.openai().completions.create(model=MODEL_NAME, prompt=want.prompt_token_ids, max_tokens=8,
                                             temperature=0)  # fmt: skip
    assert out.choices[0].text == want.text


def test_stop_string_ends_the_text(server, offline):
    text = offline["completion"].text  # " Paris. ..." : stop at its second word
    stop = text.split()[1][:2]
    out = server.openai().completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0,
                                             stop=[stop])  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_repetition_penalty_and_ignore_eos(server, offline):
    out = server.openai().completions.create(model=MODEL_NAME, prompt=PENALIZED_PROMPT, max_tokens=8, temperature=0,
                                             extra_body={"repetition_penalty": 1.5, "ignore_eos": True})  # fmt: skip
    assert out.choices[0].text == offline["penalized"].text
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"


def test_completion_logprobs_match_offline(server, offline):
    want = offline["completion"]
    out = server.openai().completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0,
                                             logprobs=3)  # fmt: skip
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for got, ref, top in zip(lp.token_logprobs, want.logprobs, lp.top_logprobs):
        assert got == pytest.approx(ref.logprob, abs=1e-4) and got <= 0
        assert len(top) <= 3 and max(top.values()) == pytest.approx(got, abs=1e-4)  # greedy: the likeliest
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


@pytest.mark.parametrize("stream", [False, True])
def test_completion_top_logprobs_hold_the_sampled_token(server, stream):
    """OpenAI's legacy logprobs: top_logprobs has up to logprobs + 1 entries, the sampled
    token always among them (a sampled token outside the top k was missing; logprobs=0 gave
    empty dicts)."""
    for k in (0, 2):
        out = server.openai().completions.create(model=MODEL_NAME, prompt=COMPLETION_PROMPT, max_tokens=8,
                                                 temperature=2.0, seed=7, logprobs=k, stream=stream)  # fmt: skip
        chunks = list(out) if stream else [out]
        tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
        values = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
        tops = [d for c in chunks for d in c.choices[0].logprobs.top_logprobs]
        assert len(tokens) == len(tops) == 8
        for token, value, top in zip(tokens, values, tops):
            assert token in top and top[token] == value and len(top) <= k + 1


def test_chat_logprobs_match_offline(server, offline):
    want = offline["chat"]
    out = server.openai().chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0,
                                                  logprobs=True, top_logprobs=2)  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for entry, ref in zip(content, want.logprobs):
        assert entry.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in ref.top], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token and bytes(entry.bytes) == entry.token.encode()


def test_logprobs_of_tokens_that_hold_part_of_a_character(server):
    """An emoji is several byte-level tokens; each decodes alone to U+FFFD. They were all
    reported as "\ufffd" with its bytes (so the bytes did not add up to the text) and, keyed
    alike, overwrote each other in a completion's top_logprobs."""
    emoji = [{"role": "user", "content": "Reply with only the emoji 😀"}]
    out = server.openai().chat.completions.create(model=MODEL_NAME, messages=emoji, max_tokens=4, temperature=0,
                                                  logprobs=True, top_logprobs=3)  # fmt: skip
    content, text = out.choices[0].logprobs.content, out.choices[0].message.content
    assert bytes(b for e in content for b in e.bytes).decode(errors="replace") == text  # may end mid-character
    pieces = [e.token for e in content if e.token.startswith("bytes:")]
    assert pieces and not any("\ufffd" in e.token for e in content)  # the model answers with an emoji
    for e in content:
        assert len({t.token for t in e.top_logprobs}) == len(e.top_logprobs) == 3
    prompt = server.engine.llm.tokenizer.apply_chat_template(emoji, add_generation_prompt=True)
    out = server.openai().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=5)
    lp, text = out.choices[0].logprobs, out.choices[0].text
    assert [len(top) for top in lp.top_logprobs] == [5] * len(lp.tokens)  # none overwritten
    assert all(max(top.values()) == pytest.approx(got, abs=1e-4) for top, got in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)


def test_streamed_text_offsets_equal_the_json_ones(server):
    """With a stop string the streamed text lags while a stop may be starting; the offsets
    counted from it did too, and disagreed with the same request's JSON answer."""
    body = {"model": MODEL_NAME, "prompt": COMPLETION_PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 1,
            "stop": [" the zebra", "\n\n\n"]}  # spaces and newlines start a possible stop: text held back
    with server.http() as http:
        whole = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
        r = http.post("/v1/completions", json=dict(body, stream=True))
    chunks = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    streamed = [o for c in chunks for lp in [c["choices"][0]["logprobs"]] if lp for o in lp["text_offset"]]
    assert streamed == whole["text_offset"] and len(streamed) == 12


def test_cached_prompt_tokens_are_reported(server):
    """The second identical prompt maps the first one's full blocks from the prefix cache."""
    messages = [{"role": "system", "content": "You answer in one word. " * 4}, *CHAT]
    client = server.openai()
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0


def test_chat_stream_with_the_openai_client(server, offline):
    stream = server.openai().chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline["chat"].text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["length" if offline["chat"].finish_reason == "length" else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(offline["chat"].token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_raw_sse(server, offline):
    """The wire format: `data: {json}` events separated by blank lines, `data: [DONE]` last."""
    body = {"model": MODEL_NAME, "prompt": COMPLETION_PROMPT, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": 1}  # fmt: skip
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    text = "".join(p["choices"][0]["text"] for p in payloads if p["choices"])
    assert text == offline["completion"].text
    tokens = [t for p in payloads if p["choices"] for t in p["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == 8 and "".join(tokens) == text
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 8
    assert len({p["id"] for p in payloads}) == 1


def test_stream_without_usage_has_no_usage_field(server):
    body = {"prompt": COMPLETION_PROMPT, "max_tokens": 2, "temperature": 0, "stream": True}  # "model" may be left out
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        events = [e for e in "".join(r.iter_text()).split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e.removeprefix("data: ")) for e in events[:-1])


def test_tokenize_and_detokenize(server, llm):
    with server.http() as http:
        out = http.post("/tokenize", json={"prompt": COMPLETION_PROMPT}).json()
        assert out["tokens"] == llm.tokenizer.encode(COMPLETION_PROMPT) and out["count"] == len(out["tokens"])
        assert out["max_model_len"] == MAX_MODEL_LEN
        chat = http.post("/tokenize", json={"messages": CHAT}).json()
        assert chat["tokens"] == llm.encode(CHAT_PROMPT)  # the chat template, as generate
        back = http.post("/detokenize", json={"tokens": out["tokens"]}).json()
        assert back["prompt"].endswith(COMPLETION_PROMPT)
        assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
        assert http.post("/tokenize", json={}).status_code == 400


def _scrape(server) -> dict:
    """{(name, labels without model_name): value} of every sample of /metrics."""
    with server.http() as http:
        text = http.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("model_name") == MODEL_NAME, s
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def test_metrics_count_what_was_served(server):
    before = _scrape(server)
    client = server.openai()
    outs = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True}) for p in (COMPLETION_PROMPT, SECOND_PROMPT)]
    after = _scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    prompt_tokens = sum(o.usage.prompt_tokens for o in outs)
    assert delta("ringfuse:prompt_tokens_total") == prompt_tokens
    assert delta("ringfuse:generation_tokens_total") == 6
    assert delta("ringfuse:request_success_total", finished_reason="length") == 2
    assert delta("ringfuse:prefix_cache_queries_total") == prompt_tokens
    assert delta("ringfuse:prefix_cache_hits_total") == sum(o.usage.prompt_tokens_details.cached_tokens for o in outs)
    assert delta("ringfuse:time_to_first_token_seconds_count") == 2
    assert delta("ringfuse:inter_token_latency_seconds_count") == 4
    assert delta("ringfuse:e2e_request_latency_seconds_count") == 2
    assert delta("ringfuse:request_queue_time_seconds_count") == 2
    assert after[("ringfuse:time_to_first_token_seconds_bucket", (("le", "+Inf"),))] >= 2
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[(f"ringfuse:{gauge}", ())] == 0  # all done
    assert all(math.isfinite(v) for v in after.values())
