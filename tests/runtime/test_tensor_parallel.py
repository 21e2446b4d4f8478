"""TP = 2 (two processes, gloo control plane, ringfuse's shared-memory ring) gives the
same tokens as TP = 1 on the default model in fp32, each rank reading only its slices."""

import pytest
import torch

from ringfuse.runtime.model import head_split
from tests.distributed.harness import run_ranks, values

PROMPTS = ["Explain photosynthesis.", "Write a haiku about the sea."]


def _tp_worker(rank, world, path):
    from ringfuse.runtime import LLM

    llm = LLM(path, tp=world, max_model_len=512, kv_cache_tokens=1024, threads=1)
    shapes = {"qkv": tuple(llm.model.layers[0].qkv.weight.shape), "embed": tuple(llm.model.embedding.table.shape)}
    results = llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    return [r.token_ids for r in results], shapes


def _tp_divergent_worker(rank, world, path):
    from ringfuse.runtime import LLM

    llm = LLM(path, tp=world, max_model_len=256, kv_cache_tokens=512, threads=1)
    outcomes = []
    for kwargs in ({"seed": rank + 1, "temperature": 1.0}, {"max_new_tokens": 4 + rank}):  # one rank's differs
        try:
            llm.generate(["Once upon a time"], **{"max_new_tokens": 4, **kwargs})
            outcomes.append("ok")
        except ValueError as e:
            outcomes.append(str(e))
    prompt = ["The capital of France is", "The capital of Spain is"][rank]  # as many tokens
    try:
        llm.generate([prompt], max_new_tokens=4)
        outcomes.append("ok")
    except ValueError as e:
        outcomes.append(str(e))
    outcomes.append(llm.generate(["Hi"], max_new_tokens=4)[0].token_ids)  # the same request: fine
    return outcomes


def test_tp_requests_that_differ_between_ranks_are_refused(default_gguf_path):
    """A seed, max_new_tokens or prompt that differs between the ranks gave each rank garbage,
    or rank 1 rank 0's answer, or an error deep in a collective."""
    got = values(run_ranks(_tp_divergent_worker, 2, str(default_gguf_path), timeout_s=300))
    for outcomes in got:
        assert all("every rank must add the same requests" in o and "rank 1 differ" in o for o in outcomes[:3])
    assert got[0][3] == got[1][3] and len(got[0][3]) == 4


def test_tp2_equals_tp1(default_gguf_path, llm_fp32):
    got = values(run_ranks(_tp_worker, 2, str(default_gguf_path), timeout_s=300))
    want = [r.token_ids for r in llm_fp32.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)]
    for rank, (tokens, shapes) in enumerate(got):
        assert tokens == want, f"rank {rank}"
    # 3 GQA groups of 3 heads over 2 ranks: 1 group (3 q heads + 1 kv head) on rank 0, 2 on rank 1
    assert got[0][1] == {"qkv": ((3 + 2 * 1) * 64, 576), "embed": (24576, 576)}
    assert got[1][1] == {"qkv": ((6 + 2 * 2) * 64, 576), "embed": (24576, 576)}


@pytest.mark.parametrize("heads,kv,world", [(9, 3, 2), (9, 3, 3), (32, 8, 4), (32, 8, 3), (8, 2, 4), (12, 12, 5)])
def test_head_split_covers_every_head_once(heads, kv, world):
    q_seen, kv_seen = [], set()
    for r in range(world):
        (q0, q1), (k0, k1) = head_split(heads, kv, world, r)
        group = heads // kv
        assert q1 - q0 == (k1 - k0) * group or (k1 - k0 == 1 and world > kv)  # uniform GQA mapping per rank
        q_seen += range(q0, q1)
        kv_seen |= set(range(k0, k1))
        assert all(h // group in range(k0, k1) for h in range(q0, q1))
    assert sorted(q_seen) == list(range(heads)) and kv_seen == set(range(kv))
