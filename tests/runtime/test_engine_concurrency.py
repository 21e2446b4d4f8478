"""One caller drives an LLM at a time; an exception inside a step leaves it usable; the
scheduler admits a full batch at once; CPU graph captures in several threads do not
interfere; large batches run without decode graphs."""

import threading

import pytest
import torch

from ringfuse import _C, ops
from ringfuse.ops import cpu_graph
from ringfuse.runtime import LLM, SamplingParams
from ringfuse.runtime.model_runner import GRAPH_MAX_BATCH

PROMPTS = ["Explain photosynthesis.", "What is the capital of France?", "Write a haiku about the sea."]


def _blocks_free(llm) -> bool:
    return llm.blocks.available() == llm.kv.num_blocks and not any(llm.blocks.refs)


def test_a_running_stream_owns_the_engine(llm_fp32):
    llm = llm_fp32
    alone = llm.generate(PROMPTS[:2], max_new_tokens=6, ignore_eos=True)
    stream = llm.stream(PROMPTS[:2], max_new_tokens=6, ignore_eos=True)
    first = next(stream)
    for call in (lambda: llm.generate(PROMPTS[2], max_new_tokens=2),
                 lambda: llm.add_request(llm.encode(PROMPTS[2]), SamplingParams(max_new_tokens=2)),
                 llm.step):  # fmt: skip
        with pytest.raises(RuntimeError, match="a stream\\(\\) of this LLM is still running"):
            call()
    got = {first.index: [first.token_id]}
    for ev in stream:  # the refused calls changed nothing: the stream's tokens are its own
        got.setdefault(ev.index, []).append(ev.token_id)
    assert [got[0], got[1]] == [r.token_ids for r in alone]
    assert _blocks_free(llm) and llm.generate(PROMPTS[2], max_new_tokens=2)[0].token_ids


def test_abort_all_takes_the_engine_back_from_an_abandoned_stream(llm_fp32):
    llm = llm_fp32
    stream = llm.stream(PROMPTS[0], max_new_tokens=50, ignore_eos=True)
    next(stream)
    llm.abort_all()
    assert list(stream) == [] and _blocks_free(llm)  # the old stream ends quietly
    assert len(llm.generate(PROMPTS[1], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3
    stream = llm.stream(PROMPTS[:2], max_new_tokens=5, ignore_eos=True)
    next(stream)  # the first of this step's two events
    llm.abort_all()
    assert list(stream) == []  # not the second: the stream ended with the abort


def test_generate_from_two_threads_never_mixes_batches(llm_fp32):
    """Each concurrent call either gets its own right answer or a clean 'busy' RuntimeError."""
    llm = llm_fp32
    want = {p: llm.generate(p, max_new_tokens=5, ignore_eos=True)[0].token_ids for p in PROMPTS[:2]}
    outcomes, start = [], threading.Barrier(2)

    def worker(prompt):
        for i in range(6):
            if i == 0:
                start.wait(timeout=60)  # both threads start together
            try:
                got = llm.generate(prompt, max_new_tokens=5, ignore_eos=True)
                outcomes.append("ok" if [r.token_ids for r in got] == [want[prompt]] else f"WRONG {got}")
            except RuntimeError as e:
                outcomes.append("busy" if "still running" in str(e) else f"error {e}")

    threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(outcomes) == 12 and set(outcomes) <= {"ok", "busy"} and "ok" in outcomes, outcomes
    assert _blocks_free(llm)


def test_an_exception_during_a_prefill_requeues_its_requests(llm_fp32, monkeypatch):
    """Ctrl-C in a prefill step left admitted requests without a first token: every later
    step failed with an IndexError and only abort_all() helped."""
    llm = llm_fp32
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    want = [r.token_ids for r in llm.generate(PROMPTS, params)]
    real = llm.runner.prefill_step
    calls = []

    def interrupted(reqs):
        calls.append(len(reqs))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(reqs)

    monkeypatch.setattr(llm.runner, "prefill_step", interrupted)
    for i, p in enumerate(PROMPTS):
        llm.add_request(llm.encode(p), params, index=i)
    queries, hits = llm.prefix_cache_queries, llm.prefix_cache_hits
    with pytest.raises(KeyboardInterrupt):
        llm.step()
    assert [r.index for r in llm.scheduler.waiting] == [0, 1, 2] and not llm.running
    assert (llm.prefix_cache_queries, llm.prefix_cache_hits) == (queries, hits)  # counted once, when it runs
    got = {}
    while llm.has_unfinished():
        for ev in llm.step():
            got.setdefault(ev.index, []).append(ev.token_id)
    assert [got[i] for i in range(3)] == want and calls == [3, 3]
    assert _blocks_free(llm)


def test_a_full_batch_is_prefilled_in_one_step(llm_fp32):
    """The admission loop counted a new request twice (it is in running and in new): 8
    queued requests were prefilled in 4 steps of 4, 2, 1 and 1."""
    llm = llm_fp32
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for i in range(llm.max_batch):
        llm.add_request(llm.encode(PROMPTS[i % 3]), params, index=i)
    sizes = []
    while llm.has_unfinished():
        sizes.append(len(llm.step()))
    assert sizes == [llm.max_batch] * 2
    assert _blocks_free(llm)


@pytest.mark.parametrize("bad", [0, -1, "2", 2.0, True, 10**6])
def test_threads_checked_before_anything_changes(bad):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="threads must be an int in"):
        LLM("/nonexistent", threads=bad)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("name", ["prefix_caching", "decode_graphs", "warm_up", "weight_cache"])
def test_flags_must_be_booleans(name):
    with pytest.raises(TypeError, match=f"{name} must be True or False.*, got 'no'"):
        LLM("/nonexistent", **{name: "no"})


def test_batches_over_the_graph_limit_run_eagerly(llm_fp32):
    runner = llm_fp32.runner
    assert runner._graph_logits([object()] * (GRAPH_MAX_BATCH + 1)) is None
    assert all(key[0] <= GRAPH_MAX_BATCH for key in runner.graphs)


def test_a_seeded_request_interrupted_in_its_prefill_draws_the_same_tokens(llm_fp32, monkeypatch):
    llm = llm_fp32
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=1234)
    want = llm.generate(PROMPTS[0], params)[0].token_ids
    real, calls = llm.runner.sample, []

    def failing(*args):
        out = real(*args)  # the draw happened: the generator moved
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(llm.runner, "sample", failing)
    llm.add_request(llm.encode(PROMPTS[0]), params, index=0)
    with pytest.raises(KeyboardInterrupt):
        llm.step()
    got = []
    while llm.has_unfinished():
        got += [ev.token_id for ev in llm.step()]
    assert got == want


# ---- CPU graph captures from several threads ----------------------------------------------


def test_a_capture_waits_for_another_threads_capture():
    """The in-progress check and the swap of _C's functions were not atomic: a second
    thread could save the first one's recording wrappers as the real functions and leave
    them installed for good (every later capture refused)."""
    x = torch.randn(4, 8)
    inside, release, done = threading.Event(), threading.Event(), []

    def first():
        with ops.capture_cpu_graph() as g:
            ops.silu_mul(x)
            inside.set()
            release.wait(timeout=60)
        done.append(("first", len(g.calls)))

    def second():
        inside.wait(timeout=60)
        with ops.capture_cpu_graph() as g:  # waits for the first capture to end
            ops.silu_mul(x)
        done.append(("second", len(g.calls)))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    inside.wait(timeout=60)
    release.set()
    for t in threads:
        t.join(timeout=60)
    assert sorted(done) == [("first", 1), ("second", 1)]
    assert not any(getattr(getattr(_C, n), "_ringfuse_recording", False) for n in dir(_C) if not n.startswith("_"))


def test_a_capture_that_cannot_wait_is_capture_busy(monkeypatch):
    monkeypatch.setattr(cpu_graph, "_CAPTURE_WAIT_S", 0.05)
    inside, release = threading.Event(), threading.Event()

    def holder():
        with ops.capture_cpu_graph():
            inside.set()
            release.wait(timeout=60)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(timeout=60)
    try:
        with pytest.raises(ops.CaptureBusy, match="did not end within"):
            with ops.capture_cpu_graph():
                pass
    finally:
        release.set()
        t.join(timeout=60)
    assert issubclass(ops.CaptureBusy, ops.NotCapturable)
