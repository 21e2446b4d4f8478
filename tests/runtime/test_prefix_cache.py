"""Prefix caching: kv_blocks.BlockPool's bookkeeping (exact prefix keys, reference counts,
LRU eviction, the last prompt token always computed) and the engine with it on: the same
tokens as without it, cached tokens reported, reuse across turns and under eviction."""

import pytest
import torch

from ringfuse.runtime import LLM, SamplingParams
from ringfuse.runtime.kv_blocks import BlockPool

BS = 4


def test_pool_reuses_whole_matching_blocks_only():
    pool = BlockPool(8, BS)
    a = list(range(10))  # 2 full blocks + 2 tokens
    blocks, cached = pool.allocate(a, 3)
    assert cached == 0 and len(blocks) == 3 and pool.available() == 5
    pool.register(a, blocks)
    b = a[:8] + [99, 98, 97]  # same first 2 blocks
    got, cached = pool.allocate(b, 3)
    assert cached == 8 and got[:2] == blocks[:2] and got[2] != blocks[2]
    c = [0, 1, 2, 3, 4, 5, 6, 77, 8]  # block 1 differs in one token: only block 0 matches
    got_c, cached = pool.allocate(c, 3)
    assert cached == 4 and got_c[0] == blocks[0] and got_c[1] not in blocks
    assert pool.refs[blocks[0]] == 3 and pool.refs[blocks[1]] == 2


def test_pool_keeps_the_last_prompt_token_to_compute():
    pool = BlockPool(4, BS)
    p = list(range(8))  # exactly 2 full blocks
    blocks, _ = pool.allocate(p, 2)
    pool.register(p, blocks)
    pool.release(blocks)
    _, cached = pool.allocate(p, 2)
    assert cached == 4  # block 1 holds the last token: computed again
    assert pool.allocate(p + [8], 3)[1] == 8


def test_pool_release_evict_and_disable():
    pool = BlockPool(3, BS)
    p = list(range(9))
    blocks, _ = pool.allocate(p, 3)
    pool.register(p, blocks)  # blocks 0, 1 cached
    assert pool.allocate([5] * 5, 1) is None  # nothing free while held
    pool.release(blocks)
    assert pool.available() == 3 and len(pool.idle) == 2
    other, cached = pool.allocate([7] * 9, 3)  # needs every block: evicts both cached ones
    assert cached == 0 and sorted(other) == sorted(blocks) and not pool.cached and not pool.key_of
    pool.release(other)
    off = BlockPool(3, BS, prefix_caching=False)
    b1, _ = off.allocate(p, 3)
    off.register(p, b1)
    off.release(b1)
    assert off.allocate(p, 3)[1] == 0 and len(off.free) == 0


def test_pool_evicts_least_recently_used_first():
    pool = BlockPool(3, BS)
    for start in (100, 200):  # two cached one-block prefixes, 100's first
        p = [start + i for i in range(5)]
        b, _ = pool.allocate(p, 2)
        pool.register(p, b)
        pool.release(b)
    touched, _ = pool.allocate([100 + i for i in range(5)], 1)  # 100's used again: 200's is now the oldest
    pool.release(touched)
    pool.allocate([9] * 8, 2)  # one free block + one eviction
    assert [k.tokens for k in pool.cached] == [tuple(range(100, 104))]


def test_pool_evicts_a_prefix_from_its_end():
    """A chain's last block goes first, so what stays cached is still a reachable prefix."""
    pool = BlockPool(3, BS)
    p = list(range(13))  # 3 full blocks + 1 token
    blocks, _ = pool.allocate(p, 3)
    pool.register(p, blocks)
    pool.release(blocks)
    pool.allocate([7] * 4, 1)  # no free block: one eviction
    assert blocks[2] not in pool.key_of and blocks[0] in pool.key_of and blocks[1] in pool.key_of
    got = pool.allocate(p[:9], 2)
    assert got is not None and got[1] == 8 and got[0] == blocks[:2]


@pytest.fixture(scope="module")
def llm_no_prefix(default_gguf_path):
    return LLM(default_gguf_path, max_batch=8, max_model_len=1024, prefix_caching=False)


PROMPTS = ["Explain photosynthesis.", "What is the capital of France?", "Write a haiku about the sea.",
           "Explain photosynthesis."]  # fmt: skip


def test_same_tokens_as_without_prefix_caching(llm_fp32, llm_no_prefix):
    llm_fp32.scheduler.blocks = type(llm_fp32.blocks)(llm_fp32.kv.num_blocks, llm_fp32.block_size)  # a cold prefix cache
    for i, p in enumerate(PROMPTS):
        got = llm_fp32.generate(p, max_new_tokens=24)[0]
        want = llm_no_prefix.generate(p, max_new_tokens=24)[0]
        assert got.token_ids == want.token_ids and got.text == want.text
        n = len(got.prompt_token_ids)
        expect = 0 if i == 0 else ((n - 1) // 16 * 16 if i == 3 else 16)  # the system prompt's full block
        assert got.cached_tokens == expect, (p, got.cached_tokens)
        assert want.cached_tokens == 0


def test_conversation_turns_reuse_earlier_turns(llm_fp32, llm_no_prefix):
    convo = [{"role": "user", "content": "Name a large river in Africa."}]
    first = llm_fp32.generate([convo], max_new_tokens=16)[0]
    convo += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "How long is it?"}]
    second = llm_fp32.generate([convo], max_new_tokens=16)[0]
    assert second.cached_tokens >= len(first.prompt_token_ids) // 16 * 16
    assert second.token_ids == llm_no_prefix.generate([convo], max_new_tokens=16)[0].token_ids


def test_batch_sharing_a_prefix_and_eviction(default_gguf_path, llm_no_prefix):
    """A small cache: requests that share the system prompt run together, and cached blocks
    are evicted to admit new prompts; every result equals the uncached engine's."""
    llm = LLM(default_gguf_path, max_batch=4, max_model_len=256, kv_cache_tokens=4 * 96)
    prompts = [f"Say the number {i} in French." for i in range(10)]
    want = [r.token_ids for r in llm_no_prefix.generate(prompts, max_new_tokens=12)]
    got = llm.generate(prompts, max_new_tokens=12)
    assert [r.token_ids for r in got] == want
    assert all(r.cached_tokens == 16 for r in got[4:])  # later waves map the system prompt's block
    again = llm.generate(prompts[:2], max_new_tokens=12)  # after eviction pressure: still right
    assert [r.token_ids for r in again] == want[:2]
    assert llm.blocks.available() == llm.kv.num_blocks and not any(llm.blocks.refs)
    # continuous batching: a request joining mid-decode maps the prefix held by a running one
    llm.add_request(llm.encode(prompts[0]), SamplingParams(max_new_tokens=8, ignore_eos=True), index=0)
    llm.step()
    llm.step()
    llm.add_request(llm.encode(prompts[1]), SamplingParams(max_new_tokens=4, ignore_eos=True), index=1)
    done = {}
    while llm.has_unfinished():
        for ev in llm.step():
            if ev.finished:
                done[ev.index] = ev.result
    assert done[1].cached_tokens >= 16 and done[1].token_ids == want[1][:4]
    assert done[0].token_ids == llm_no_prefix.generate(prompts[:1], max_new_tokens=8, ignore_eos=True)[0].token_ids
    assert torch.tensor(llm.blocks.refs).sum() == 0


def test_a_request_done_at_its_first_token_still_caches_its_prompt(llm_fp32):
    llm_fp32.scheduler.blocks = type(llm_fp32.blocks)(llm_fp32.kv.num_blocks, llm_fp32.block_size)
    first = llm_fp32.generate(PROMPTS[0], max_new_tokens=1)[0]
    again = llm_fp32.generate(PROMPTS[0], max_new_tokens=1)[0]
    assert first.cached_tokens == 0 and again.cached_tokens == (len(first.prompt_token_ids) - 1) // 16 * 16
    assert again.token_ids == first.token_ids
