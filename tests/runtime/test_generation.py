"""The runtime on the default model (SmolLM2-135M-Instruct) against HF transformers loading
the same GGUF: prefill logits, greedy tokens, reduced-precision agreement, batching,
streaming, sampling controls and bad input."""

import pytest
import torch

from ringfuse.runtime import LLM, SamplingParams
from ringfuse.runtime.model import Step

PROMPTS = ["Explain photosynthesis.", "What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers and say why they are prime."]  # fmt: skip
NEAR_TIE = 1e-3  # top-2 logit gap under which fp32 engines may legitimately pick differently


def _prefill_logits(llm, ids) -> torch.Tensor:
    """[T, V] fp32 logits of every prompt position (teacher forcing)."""
    T = len(ids)
    kv = llm.model.new_kv_cache(-(-T // 16), 16)
    step = Step(input_ids=torch.tensor(ids), positions=torch.arange(T), slot_mapping=torch.arange(T),
                cu_seqlens=torch.tensor([0, T], dtype=torch.int32), max_seqlen=T)  # fmt: skip
    with torch.no_grad():
        return llm.model.logits(llm.model.forward(step, kv))


def _hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
                          pad_token_id=2)  # fmt: skip
    return out.sequences[0, len(ids):].tolist(), torch.stack(out.scores)[:, 0]  # [n], [n, V]


def test_prefill_logits_match_hf(llm_fp32, hf_reference):
    hf, _ = hf_reference
    ids = llm_fp32.encode(PROMPTS[0])
    ours = _prefill_logits(llm_fp32, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    assert ours.shape == ref.shape == (len(ids), 49152)
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_hf(llm_fp32, hf_reference, prompt):
    hf, _ = hf_reference
    ids = llm_fp32.encode(prompt)
    ours = llm_fp32.generate([ids], max_new_tokens=32, ignore_eos=True)[0].token_ids
    ref, scores = _hf_greedy(hf, ids, 32)
    assert len(ours) == 32
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:  # allowed only after a near-tie of HF's top two logits
            top2 = scores[i].topk(2).values
            assert (top2[0] - top2[1]).item() < NEAR_TIE, f"token {i}: {a} vs HF {b}, gap {top2[0] - top2[1]}"
            break


def test_chat_template_ids_match_hf(llm_fp32, hf_reference):
    _, tok = hf_reference
    ref = tok.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)  # fmt: skip
    assert llm_fp32.encode(PROMPTS[1]) == list(ref)


@pytest.fixture(scope="module")
def teacher_text(llm_fp32):
    """>= 256 positions of real text: prompts and the fp32 engine's own continuations."""
    results = llm_fp32.generate(PROMPTS, max_new_tokens=64, ignore_eos=True)
    ids = [t for p, r in zip(PROMPTS, results) for t in llm_fp32.encode(p) + r.token_ids]
    assert len(ids) >= 256
    return ids[:300]


@pytest.mark.parametrize("dtype,quant,need", [("bf16", "none", 0.97), ("fp32", "w8a16", 0.95)])
def test_reduced_precision_top1_agreement(default_gguf_path, llm_fp32, teacher_text, dtype, quant, need):
    other = LLM(default_gguf_path, dtype=dtype, quant=quant, max_model_len=1024, kv_cache_tokens=512)
    ref = _prefill_logits(llm_fp32, teacher_text)[-256:].argmax(-1)
    got = _prefill_logits(other, teacher_text)[-256:].argmax(-1)
    agreement = (ref == got).float().mean().item()
    assert agreement >= need, f"{dtype}/{quant}: top-1 agreement {agreement:.3f} < {need}"


def test_batched_equals_one_by_one(llm_fp32):
    single = [llm_fp32.generate(p, max_new_tokens=24)[0] for p in PROMPTS]
    batched = llm_fp32.generate(PROMPTS, max_new_tokens=24)
    for s, b in zip(single, batched):
        assert s.token_ids == b.token_ids and s.text == b.text and s.finish_reason == b.finish_reason


def test_continuous_batching_joins_between_steps(llm_fp32):
    """A request added while others decode gets the tokens it gets alone; finished ones leave."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = {p: llm_fp32.generate(p, max_new_tokens=12, ignore_eos=True)[0].token_ids for p in PROMPTS[:3]}
    got = {}
    llm_fp32.add_request(llm_fp32.encode(PROMPTS[0]), params, index=0)
    llm_fp32.add_request(llm_fp32.encode(PROMPTS[1]), SamplingParams(max_new_tokens=3, ignore_eos=True), index=1)
    for step in range(40):
        if step == 4:
            llm_fp32.add_request(llm_fp32.encode(PROMPTS[2]), params, index=2)
            assert len(llm_fp32.running) == 1  # request 1 finished after 3 tokens and left
        for ev in llm_fp32.step():
            got.setdefault(ev.index, []).append(ev.token_id)
        if not llm_fp32.has_unfinished():
            break
    assert got[0] == alone[PROMPTS[0]] and got[2] == alone[PROMPTS[2]] and got[1] == alone[PROMPTS[1]][:3]
    assert llm_fp32.blocks.available() == llm_fp32.kv.num_blocks and not any(llm_fp32.blocks.refs)


def test_stream_pieces_add_up_to_the_result(llm_fp32):
    events = list(llm_fp32.stream(PROMPTS[2], max_new_tokens=20))
    assert events[-1].finished and all(not e.finished for e in events[:-1])
    result = events[-1].result
    assert "".join(e.text for e in events) == result.text
    assert [e.token_id for e in events] == result.token_ids
    assert result.text == llm_fp32.tokenizer.decode(
        [t for t in result.token_ids if t not in llm_fp32.output.eos_ids], skip_special_tokens=True)


def test_eos_and_length_finish(llm_fp32):
    r = llm_fp32.generate(PROMPTS[1], max_new_tokens=64)[0]
    assert r.finish_reason == "eos" and r.token_ids[-1] in llm_fp32.output.eos_ids and "Paris" in r.text
    r = llm_fp32.generate(PROMPTS[1], max_new_tokens=3)[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 3


def test_stop_string_cuts_the_text(llm_fp32):
    full = llm_fp32.generate(PROMPTS[0], max_new_tokens=40, ignore_eos=True)[0].text
    word = full.split()[5]
    events = list(llm_fp32.stream(PROMPTS[0], max_new_tokens=40, stop=[word], ignore_eos=True))
    r = events[-1].result
    assert r.finish_reason == "stop" and r.text == full[: full.index(word)]
    assert "".join(e.text for e in events) == r.text  # nothing past the stop string was streamed


def test_sampling_is_seeded_and_independent_of_the_batch(llm_fp32):
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7)
    a = llm_fp32.generate(PROMPTS[0], **kw)[0].token_ids
    b = llm_fp32.generate([PROMPTS[0], PROMPTS[1]], **kw)[0].token_ids
    c = llm_fp32.generate(PROMPTS[0], **{**kw, "seed": 8})[0].token_ids
    assert a == b and a != c


def test_token_id_prompts_and_raw(llm_fp32):
    ids = llm_fp32.encode(PROMPTS[1])
    assert llm_fp32.generate(ids, max_new_tokens=5)[0].token_ids == llm_fp32.generate(PROMPTS[1], max_new_tokens=5)[0].token_ids
    raw = llm_fp32.encode("Hello", raw=True)
    assert raw == llm_fp32.tokenizer.encode("Hello")


def test_bad_input(llm_fp32, default_gguf_path):
    with pytest.raises(ValueError, match="context"):
        llm_fp32.generate([5] * 1024, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"token ids must be ints in \[0, 49152\)"):
        llm_fp32.generate([1, 49152], max_new_tokens=1)
    with pytest.raises(TypeError, match="prompt must be a str"):
        llm_fp32.generate([3.5], max_new_tokens=1)
    with pytest.raises(ValueError, match="prompts must not be empty"):
        llm_fp32.generate([], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm_fp32.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        llm_fp32.generate("hi", top_p=0.0)
    for kw, match in [({"dtype": "fp16"}, "dtype"), ({"quant": "int4"}, "quant"), ({"tp": 0}, "tp"),
                      ({"max_model_len": 10**6}, "max_model_len")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            LLM(default_gguf_path, **kw)
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM("/nonexistent/model.gguf")
    assert not llm_fp32.has_unfinished()


def test_decode_graphs_equal_eager(default_gguf_path, llm_fp32):
    """Decode steps replayed as CPU graphs (one per batch size, captured on first use) give
    the eager engine's tokens, batch sizes changing as requests finish; a capture that is
    refused leaves the engine eager with the same results."""
    from ringfuse.runtime import model as model_mod

    eager = LLM(default_gguf_path, max_batch=8, max_model_len=1024, decode_graphs=False)
    params = [dict(max_new_tokens=n) for n in (5, 17, 9, 24)]
    want = [eager.generate(p, **kw)[0] for p, kw in zip(PROMPTS, params)]
    for r in want:
        assert eager.runner.graphs is None and r.token_ids
    got = [llm_fp32.generate(p, **kw)[0] for p, kw in zip(PROMPTS, params)]
    batched = llm_fp32.generate(PROMPTS, max_new_tokens=24)  # 4, then fewer as some stop at eos
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [b.token_ids for b in batched] == [e.token_ids for e in eager.generate(PROMPTS, max_new_tokens=24)]
    assert llm_fp32.runner.graphs and all(g.graph.calls for g in llm_fp32.runner.graphs.values())
    refused = LLM(default_gguf_path, max_batch=8, max_model_len=1024)
    refused.runner.graphs.clear()
    real = model_mod.ops.silu_mul
    try:  # a torch op in the decode step: capture refuses, the engine stays eager
        model_mod.ops.silu_mul = lambda x: torch.nn.functional.silu(x[:, : x.shape[1] // 2]) * x[:, x.shape[1] // 2 :]
        out = refused.generate(PROMPTS[0], max_new_tokens=5)[0]
    finally:
        model_mod.ops.silu_mul = real
    assert refused.runner.graphs == {(1, torch.get_num_threads()): False} and out.token_ids == want[0].token_ids


def test_sampling_params_object_or_keywords(llm_fp32):
    """Sampling settings come as one SamplingParams or as its fields by keyword, not both."""
    params = SamplingParams(max_new_tokens=5, temperature=0.8, seed=3)
    got = llm_fp32.generate(PROMPTS[0], params)[0].token_ids
    assert got == llm_fp32.generate(PROMPTS[0], max_new_tokens=5, temperature=0.8, seed=3)[0].token_ids
    assert [ev.token_id for ev in llm_fp32.stream(PROMPTS[0], params)] == got
    with pytest.raises(TypeError, match="not both"):
        llm_fp32.generate("hi", params, max_new_tokens=3)
    with pytest.raises(TypeError, match="max_tokens"):
        llm_fp32.generate("hi", max_tokens=3)
    with pytest.raises(TypeError, match="params must be a SamplingParams, got dict"):
        llm_fp32.generate("hi", {"max_new_tokens": 3})


def test_explicit_warm_up(default_gguf_path):
    """warm_up=False leaves the engine cold (nothing captured, nothing cached); warm_up() then
    runs the batch-1 decode graph's capture and leaves no request or counted lookup behind."""
    llm = LLM(default_gguf_path, max_batch=2, max_model_len=256, warm_up=False)
    assert llm.runner.graphs == {} and llm.kv_cache_usage() == 0.0
    llm.warm_up()
    assert list(llm.runner.graphs) == [(1, torch.get_num_threads())]
    assert not llm.has_unfinished() and llm.kv_cache_usage() == 0.0
    assert llm.prefix_cache_queries == llm.prefix_cache_hits == 0
