"""Hostile but possible inputs to LLM.generate: extreme sampling values run (or are clear
errors), and prompts that are not text are clear errors, never a traceback from deep inside."""

import pytest

PROMPT = "What is the capital of France?"


def test_tiny_temperature_is_greedy(llm_fp32):
    greedy = llm_fp32.generate(PROMPT, max_new_tokens=8)[0].token_ids
    assert llm_fp32.generate(PROMPT, max_new_tokens=8, temperature=1e-40, seed=1)[0].token_ids == greedy


@pytest.mark.parametrize("penalty", [1e-40, 1e38])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_extreme_repetition_penalty_runs(llm_fp32, penalty, temperature):
    r = llm_fp32.generate(PROMPT, max_new_tokens=6, temperature=temperature, repetition_penalty=penalty, seed=3)[0]
    assert len(r.token_ids) >= 1


def test_seeds_over_the_uint64_range(llm_fp32):
    for seed in (2**63, 2**64 - 1):
        a, b = (llm_fp32.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=seed)[0].token_ids for _ in "ab")
        assert a == b, seed
    for seed, exc in ((-1, ValueError), (2**64, ValueError), (True, TypeError), (1.0, TypeError)):
        with pytest.raises(exc, match="seed"):
            llm_fp32.generate(PROMPT, max_new_tokens=2, seed=seed)


@pytest.mark.parametrize("prompts, exc, match", [
    (b"hi", TypeError, "got bytes: decode"),
    ([b"hi"], TypeError, "got bytes: decode"),
    ("a\udcffb", ValueError, "the prompt is not valid Unicode"),
    (["ok", "a\udcffb"], ValueError, "not valid Unicode"),
    ([[{"role": "user"}]], ValueError, r"messages\[0\] has no 'content'"),
    ([{"role": "system", "content": "x"}, {"content": "hi"}], ValueError, r"messages\[1\] has no 'role'"),
    ([[{"role": "user", "content": b"x"}]], TypeError, r"messages\[0\]\['content'\] must be a str"),
])  # fmt: skip
def test_prompts_that_are_not_text(llm_fp32, prompts, exc, match):
    with pytest.raises(exc, match=match):
        llm_fp32.generate(prompts, max_new_tokens=2)
    assert not llm_fp32.has_unfinished()
