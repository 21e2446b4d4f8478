"""What a server needs from the engine: aborting one request (its blocks freed, the batch
going on), per-token log-probabilities (only when asked), the capacity check before
queueing, and the prefix-cache and KV-usage counters."""

import pytest
import torch

from ringfuse.runtime import SamplingParams
from ringfuse.runtime.model import Step
from ringfuse.runtime.sampling import TokenLogprobs, token_logprobs

PROMPTS = ["Explain photosynthesis.", "What is the capital of France?", "Write a haiku about the sea."]


def _blocks_free(llm) -> bool:
    return llm.blocks.available() == llm.kv.num_blocks and not any(llm.blocks.refs)


def test_abort_frees_the_blocks_and_the_batch_goes_on(llm_fp32):
    llm = llm_fp32
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True)[0].token_ids
    llm.add_request(llm.encode(PROMPTS[0]), SamplingParams(max_new_tokens=200, ignore_eos=True), index=0)
    llm.add_request(llm.encode(PROMPTS[1]), params, index=1)
    llm.add_request(llm.encode(PROMPTS[2]), params, index=2)
    got = {}
    for _ in range(3):
        for ev in llm.step():
            got.setdefault(ev.index, []).append(ev.token_id)
    held = llm.kv.num_blocks - llm.blocks.available()
    assert llm.abort(0) and llm.abort(2)  # two of the three decoding
    assert llm.kv.num_blocks - llm.blocks.available() < held and [r.index for r in llm.running] == [1]
    assert not llm.abort(0) and not llm.abort(99)  # gone already / never added
    while llm.has_unfinished():
        for ev in llm.step():
            assert ev.index == 1
            got[1].append(ev.token_id)
    assert got[1] == alone  # the request left in the batch got the tokens it gets alone
    assert _blocks_free(llm)


def test_abort_a_waiting_request(llm_fp32):
    llm = llm_fp32
    llm.add_request(llm.encode(PROMPTS[0]), SamplingParams(max_new_tokens=2), index=7)
    assert llm.abort(7) and not llm.has_unfinished() and not llm.step()
    assert _blocks_free(llm)


def test_logprobs_are_the_models_log_softmax(llm_fp32):
    """Each token's logprob is log_softmax of the raw logits at its position (teacher-forced
    over prompt + tokens); the top k are the k likeliest, best first; the greedy pick is the top."""
    llm = llm_fp32
    ids = llm.encode(PROMPTS[1])
    r = llm.generate([ids], max_new_tokens=6, ignore_eos=True, logprobs=3)[0]
    assert len(r.logprobs) == 6 and all(isinstance(lp, TokenLogprobs) for lp in r.logprobs)
    seq = ids + r.token_ids[:-1]
    T = len(seq)
    kv = llm.model.new_kv_cache(-(-T // 16), 16)
    step = Step(input_ids=torch.tensor(seq), positions=torch.arange(T), slot_mapping=torch.arange(T),
                cu_seqlens=torch.tensor([0, T], dtype=torch.int32), max_seqlen=T)  # fmt: skip
    with torch.no_grad():
        ref = llm.model.logits(llm.model.forward(step, kv))[len(ids) - 1 :].log_softmax(-1)  # [6, V]
    for i, (token, lp) in enumerate(zip(r.token_ids, r.logprobs)):
        assert lp.logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        assert len(lp.top) == 3 and lp.top[0][0] == token
        assert [t for t, _ in lp.top] == ref[i].topk(3).indices.tolist()
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    streamed = list(llm.stream([ids], max_new_tokens=2, ignore_eos=True, logprobs=0))
    assert all(ev.logprobs.top == () for ev in streamed) and streamed[-1].result.logprobs[0] == streamed[0].logprobs
    plain = list(llm.stream([ids], max_new_tokens=2))
    assert all(ev.logprobs is None for ev in plain) and plain[-1].result.logprobs is None


def test_logprobs_of_a_sampled_token_ignore_the_sampling_settings(llm_fp32):
    """Reported under the model's distribution, whatever temperature / top-k did."""
    ids = llm_fp32.encode(PROMPTS[2])
    hot = llm_fp32.generate([ids], max_new_tokens=1, temperature=5.0, top_k=3, seed=1, logprobs=1)[0]
    cold = llm_fp32.generate([ids], max_new_tokens=1, logprobs=1)[0]
    (hot_top, hot_v), = hot.logprobs[0].top
    (cold_top, cold_v), = cold.logprobs[0].top
    assert hot_top == cold_top and hot_v == pytest.approx(cold_v, abs=1e-4)
    assert hot.logprobs[0].logprob <= hot_v


def test_token_logprobs_only_for_the_rows_that_ask():
    logits = torch.randn(3, 50)
    out = token_logprobs(logits, [4, 7, 9], [2, None, 0])
    ref = logits.log_softmax(-1)
    assert out[1] is None
    assert out[0].logprob == pytest.approx(ref[0, 4].item()) and out[2].logprob == pytest.approx(ref[2, 9].item())
    assert [t for t, _ in out[0].top] == ref[0].topk(2).indices.tolist() and out[2].top == ()
    assert token_logprobs(logits, [1, 2, 3], [None] * 3) == [None] * 3
    assert len(token_logprobs(logits, [1, 2, 3], [10**6, None, None])[0].top) == 50  # at most the vocabulary


@pytest.mark.parametrize("value,exc", [("3", TypeError), (True, TypeError), (1.5, TypeError), (-1, ValueError)])
def test_logprobs_param_is_checked(value, exc):
    with pytest.raises(exc, match="logprobs"):
        SamplingParams(logprobs=value)


def test_check_request_before_queueing(llm_fp32, monkeypatch):
    llm = llm_fp32
    assert llm.max_request_tokens == llm.max_model_len  # the cache holds more than one context
    llm.check_request(llm.max_model_len - 1, SamplingParams(max_new_tokens=10**6))  # capped at the context: fits
    monkeypatch.setattr(llm.blocks, "num_blocks", 4)  # a cache of 64 tokens
    assert llm.max_request_tokens == 64
    with pytest.raises(ValueError, match="needs 112 cache tokens but the cache holds 64"):
        llm.check_request(10, SamplingParams(max_new_tokens=100))
    with pytest.raises(ValueError, match="raise kv_cache_tokens"):
        llm.add_request([1] * 10, SamplingParams(max_new_tokens=100))
    assert not llm.has_unfinished()


def test_refused_requests_leave_nothing_queued(llm_fp32, monkeypatch):
    """A prompt refused by generate() or add_request() queues nothing: a batch whose second
    prompt did not fit left the first queued and the engine 'busy' for good, and bad token ids
    were taken (-5 as token 49147) or failed inside step()."""
    llm = llm_fp32
    want = llm.generate("Hi", max_new_tokens=3)[0].token_ids
    with pytest.raises(ValueError, match="at least one new token must fit"):
        llm.check_request(llm.max_model_len, SamplingParams())  # was capped at the context and passed
    monkeypatch.setattr(llm.blocks, "num_blocks", 4)  # a cache of 64 tokens
    with pytest.raises(ValueError, match="raise kv_cache_tokens"):
        llm.generate(["Hi", "word " * 100], max_new_tokens=4)
    assert not llm.has_unfinished()
    vocab = llm.config.vocab_size
    for ids, exc, match in (([-5], ValueError, r"in \[0, 49152\), got \[-5\]"), ([vocab], ValueError, "token ids"),
                            ([1, True], ValueError, "token ids"), ([], ValueError, "at least one token"),
                            ([1] * llm.max_model_len, ValueError, "at least one new token must fit"),
                            ("Hi", TypeError, "prompt_ids must be a list")):  # fmt: skip
        with pytest.raises(exc, match=match):
            llm.add_request(ids, SamplingParams(max_new_tokens=3))
        assert not llm.has_unfinished()
    monkeypatch.undo()
    assert llm.generate("Hi", max_new_tokens=3)[0].token_ids == want


def test_small_contexts_and_caches_are_usable_or_refused_up_front(default_gguf_path):
    """max_model_len 2-4 failed in the constructor's warm-up (a 4-token prompt the user
    never gave); kv_cache_tokens 0 became the default and a float failed inside torch."""
    from ringfuse.runtime import LLM

    llm = LLM(default_gguf_path, max_model_len=3, max_batch=1)  # the warm-up runs
    assert len(llm.generate([1], max_new_tokens=8)[0].token_ids) == 2  # the context: 1 + 2
    llm.warm_up()
    for tokens in (2, 3, 5):  # a cache smaller than the warm-up's 4 + 2 tokens
        small = LLM(default_gguf_path, kv_cache_tokens=tokens, block_size=1, max_batch=1)
        assert small.max_request_tokens == tokens
        assert len(small.generate([1], max_new_tokens=tokens - 1, ignore_eos=True)[0].token_ids) == tokens - 1
    for bad in (0, 1, 100.5, "100", True):
        with pytest.raises(ValueError, match="kv_cache_tokens must be an int >= 2"):
            LLM(default_gguf_path, kv_cache_tokens=bad)


def test_prefix_cache_counters_and_kv_usage(llm_fp32):
    llm = llm_fp32
    ids = llm.encode("You are a helpful assistant. " * 6 + PROMPTS[0])
    assert llm.kv_cache_usage() == 0
    q0, h0 = llm.prefix_cache_queries, llm.prefix_cache_hits
    first = llm.generate([ids], max_new_tokens=1)[0]
    llm.add_request(ids, SamplingParams(max_new_tokens=2), index=0)
    llm.step()
    assert 0 < llm.kv_cache_usage() <= 1  # held by the running request
    llm.abort_all()
    assert llm.kv_cache_usage() == 0  # cached prefix blocks nobody holds count as free
    assert llm.prefix_cache_queries - q0 == 2 * len(ids)
    assert llm.prefix_cache_hits - h0 == first.cached_tokens + (len(ids) - 1) // 16 * 16
