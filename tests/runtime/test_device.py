"""``LLM(device=...)``: argument checks, the KV cache sized from a GPU's free memory, the
model copied to a device with the same numbers, the GPU runner's sampling run on CPU
tensors, greedy tokens equal to HF transformers' in fp32 and in bf16 for every
architecture family; on a GPU (gpu-marked) the same greedy check on the same GPU,
CUDA-graph decode equal to eager bit for bit, the int8 modes, seeded sampling there."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringfuse.layers import KVCache, Step  # noqa: E402
from ringfuse.runtime import LLM  # noqa: E402
from ringfuse.runtime.engine import kv_tokens_that_fit  # noqa: E402
from ringfuse.runtime.model import DecoderModel  # noqa: E402
from ringfuse.runtime.model_runner import _on  # noqa: E402
from ringfuse.runtime.weights import open_weights  # noqa: E402

from .test_architectures import KINDS as ARCH_KINDS  # noqa: E402
from .test_architectures import _build as build_arch  # noqa: E402
from .test_weights import (  # noqa: E402
    _build_hf,
    _prompts,
    assert_greedy_like_hf,
    check_greedy_tokens_match_hf,
    folder_with_tokenizer,
    saved_models,
)

GPU_KINDS = {"llama": None, "llama_bias": None, "qwen2": None, "qwen3": "arch", "gemma2": "arch",
             "mistral_window": "arch"}  # fmt: skip


def _build(kind, seed):
    return build_arch(kind, seed) if kind in ARCH_KINDS else _build_hf(kind, seed)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory, tuple(GPU_KINDS), _build, first_seed=300)


# ---------------------------------------------------------------------------------------
# Anywhere


@pytest.mark.parametrize("device", ["tpu", "cuda:x", 3.5, "meta"])
def test_bad_device_is_refused(models, device):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        LLM(models["llama"][2], device=device, warm_up=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_says_so(models):
    with pytest.raises(ValueError, match=r"needs a CUDA device, but torch.cuda.is_available\(\) is False"):
        LLM(models["llama"][2], device="cuda", warm_up=False)


@pytest.mark.parametrize("value", [0, 1.5, -0.1, True, "0.9"])
def test_bad_gpu_memory_utilization_is_refused(models, value):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be a number in"):
        LLM(models["llama"][2], gpu_memory_utilization=value, warm_up=False)


def test_kv_tokens_that_fit():
    gib = 1 << 30
    # 80 GiB, 70 free (10 used by weights and context), 90 %: 72 - 10 = 62 GiB for the cache
    assert kv_tokens_that_fit(70 * gib, 80 * gib, 0.9, 1 << 17, 10**9, 8192) == int(80 * gib * 0.9 - 10 * gib) >> 17
    assert kv_tokens_that_fit(70 * gib, 80 * gib, 0.9, 1 << 17, 4096 * 8, 4096) == 4096 * 8  # capped at what is wanted
    with pytest.raises(ValueError, match="raise gpu_memory_utilization, lower max_model_len"):
        kv_tokens_that_fit(10 * gib, 80 * gib, 0.9, 1 << 20, 10**9, 8192)  # 2 GiB left: 2048 tokens < 8192
    with pytest.raises(ValueError, match="0 are left"):
        kv_tokens_that_fit(1 * gib, 80 * gib, 0.5, 1 << 10, 10**9, 16)  # more in use than the share allowed


def test_kv_bytes_per_token():
    assert KVCache.bytes_per_token(30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    assert KVCache.bytes_per_token(32, 8, 128, torch.float32) == 2 * 32 * 8 * 128 * 4


def test_step_to_device_keeps_every_field():
    step = Step(input_ids=torch.tensor([1, 2]), positions=torch.tensor([0, 1]), slot_mapping=torch.tensor([5, 6]),
                cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), max_seqlen=2)  # fmt: skip
    moved = _on(step, torch.device("cpu"))
    assert moved.max_seqlen == 2 and moved.block_table is None and moved.logit_rows is None
    assert all(torch.equal(getattr(moved, n), getattr(step, n)) for n in ("input_ids", "positions", "slot_mapping",
                                                                           "cu_seqlens"))  # fmt: skip


@pytest.mark.parametrize("quant", ["none", "w8a16", "w8a8"])
def test_model_on_device_has_the_same_numbers(models, quant):
    """on_device rebuilds the model from its converted tensors (what a GPU copy does): on
    the CPU the result gives bitwise the same logits."""
    weights = open_weights(models["gemma2"][2])
    lm = DecoderModel(weights, quant=quant)
    again = lm.on_device(weights, torch.device("cpu"))
    kv_a, kv_b = lm.new_kv_cache(8, 4), again.new_kv_cache(8, 4)
    ids = torch.tensor(_prompts(3, (7,))[0])
    step = Step(input_ids=ids, positions=torch.arange(7), slot_mapping=torch.arange(7),
                cu_seqlens=torch.tensor([0, 7], dtype=torch.int32), max_seqlen=7)  # fmt: skip
    with torch.no_grad():
        assert torch.equal(lm.logits(lm.forward(step, kv_a)), again.logits(again.forward(step, kv_b)))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(GPU_KINDS))
def test_greedy_tokens_match_hf_in_the_same_dtype(models, kind, dtype, tmp_path):
    """What the GPU test checks, on the CPU: both in fp32 or both in bf16, the same greedy
    tokens up to HF's near-ties, for every architecture family."""
    hf32, _, path = models[kind]
    check_greedy_tokens_match_hf(hf32, path, tmp_path, dtype=dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_prefix_caching_and_continuous_batching_match_hf(models, device, tmp_path):
    """A request that joins while another decodes, and maps that one's cached prompt
    prefix (one 16-token block), and the first request itself: both HF's greedy tokens (up
    to a near-tie), fp32 on either device."""
    import copy

    from ringfuse.runtime import SamplingParams

    hf32, _, path = models["llama"]
    llm = LLM(folder_with_tokenizer(path, tmp_path), device=device, dtype="fp32", max_model_len=64,
              kv_cache_tokens=256, weight_cache=False)  # fmt: skip
    shared = _prompts(9, (20,))[0]
    prompts = [shared + tail for tail in _prompts(10, (3, 5))]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    llm.add_request(prompts[0], params, index=0)
    llm.step()  # its prefill: its prompt's full block goes into the prefix cache
    llm.step()
    llm.add_request(prompts[1], params, index=1)
    done = {}
    while llm.has_unfinished():
        for ev in llm.step():
            if ev.finished:
                done[ev.index] = ev.result
    assert done[0].cached_tokens == 0 and done[1].cached_tokens == 16
    hf = copy.deepcopy(hf32).to(device)
    for i in (0, 1):
        assert len(done[i].token_ids) == 8
        assert_greedy_like_hf(hf, prompts[i], done[i].token_ids, device)


def test_the_gpu_runners_sampling_on_the_cpu(models, tmp_path):
    """CudaModelRunner.sample (select_on_device, logprobs on the logits' device) put in the
    CPU runner's place: greedy requests with a repetition penalty give the CPU runner's
    tokens and logprobs; seeded sampled requests repeat their tokens."""
    import types

    from ringfuse.runtime.model_runner import CudaModelRunner

    llm = LLM(folder_with_tokenizer(models["llama"][2], tmp_path), max_model_len=64, kv_cache_tokens=256,
              weight_cache=False)  # fmt: skip
    prompts = _prompts(5, (6, 9, 3))
    greedy = dict(max_new_tokens=6, ignore_eos=True, logprobs=2, repetition_penalty=1.3)
    sampled = dict(max_new_tokens=6, ignore_eos=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    want = llm.generate(prompts, **greedy)
    llm.runner.device = torch.device("cpu")
    llm.runner.sample = types.MethodType(CudaModelRunner.sample, llm.runner)
    got = llm.generate(prompts, **greedy)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.logprobs for r in got] == [r.logprobs for r in want]
    first, again = llm.generate(prompts, **sampled), llm.generate(prompts, **sampled)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert all(len(r.token_ids) == 6 and all(0 <= t < 128 for t in r.token_ids) for r in first)


# ---------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(GPU_KINDS))
def test_gpu_greedy_tokens_match_hf_on_the_gpu(models, kind, dtype, tmp_path):
    """Both on the GPU in the same dtype (bf16 is the GPU default)."""
    hf32, _, path = models[kind]
    check_greedy_tokens_match_hf(hf32, path, tmp_path, device="cuda", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "w8a16", "w8a8"])
def test_gpu_cuda_graph_decode_equals_eager(models, quant, tmp_path):
    """The same requests with and without CUDA graphs: the same tokens and logprobs (the
    same kernels on the same data); bf16, the GPU default."""
    path = folder_with_tokenizer(models["qwen3"][2], tmp_path)
    kw = dict(device="cuda", quant=quant, max_model_len=64, kv_cache_tokens=512, weight_cache=False)
    graphs, eager = LLM(path, **kw), LLM(path, decode_graphs=False, **kw)
    assert graphs.dtype == torch.bfloat16 and graphs.kv.k[0].is_cuda and graphs.kv.num_blocks >= 64 // 16
    prompts = _prompts(7, (9, 4, 6))
    a = graphs.generate(prompts, max_new_tokens=10, ignore_eos=True, logprobs=2)
    b = eager.generate(prompts, max_new_tokens=10, ignore_eos=True, logprobs=2)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert set(graphs.runner.graphs) >= {1, 3}


@pytest.mark.gpu
def test_gpu_sampling_with_a_seed(models, tmp_path):
    """Requests with temperature, top-k and a seed are drawn on the GPU from their own
    generators there (select_on_device): the same seed gives the same tokens again, and
    repetition penalties and logprobs work there too."""
    path = folder_with_tokenizer(models["llama"][2], tmp_path)
    llm = LLM(path, device="cuda", max_model_len=64, weight_cache=False)  # the KV cache sized from free memory
    prompts = _prompts(11, (5, 8))
    params = dict(max_new_tokens=8, temperature=0.8, top_k=20, seed=7, ignore_eos=True, repetition_penalty=1.3,
                  logprobs=1)  # fmt: skip
    first, again = llm.generate(prompts, **params), llm.generate(prompts, **params)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert all(len(r.logprobs) == 8 for r in first)
    assert all(len(r.token_ids) == 8 and all(0 <= t < 128 for t in r.token_ids) for r in first)
