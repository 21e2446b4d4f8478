"""ringfuse.runtime.weights + model: tiny random HF models (Llama tied / untied, Mistral,
Qwen2 with q/k/v biases, Llama with attention_bias + mlp_bias, Llama 3.1 RoPE scaling)
saved as safetensors folders and as
hand-written GGUF files, loaded by ``open_weights`` and run by ``DecoderModel``; the logits
are checked against HF transformers running the same weights.

Tolerance (ARCHITECTURE.md, "Numerics"): ringfuse's fp32 error vs an fp64 copy of the HF model is
at most 2x the error of HF's own fp32 run vs that fp64 reference (with a 1e-5 floor: on
these tiny models both errors are ~1e-7 and summation order alone can exceed 2x)."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
try:
    import gguf
except ImportError:  # the GPU machine's image has no gguf: only the tests that write GGUF files skip
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package")

from ringfuse.runtime.model import DecoderModel, Step  # noqa: E402
from ringfuse.runtime.weights import open_weights  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # fmt: skip
KINDS = ("llama", "llama_tied", "mistral", "qwen2", "llama3_rope", "llama_bias")
BLOCK = 4  # small pages so a 10-token prompt spans several, placed out of order


def _hf_config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**SMALL)
    if kind == "llama_tied":
        return transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)
    if kind == "llama_bias":  # biases on q/k/v/o and gate/up/down
        return transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)
    if kind == "llama3_rope":
        return transformers.LlamaConfig(**SMALL, rope_scaling=dict(LLAMA3_ROPE))
    if kind == "mistral":
        return transformers.MistralConfig(**SMALL)
    if kind == "qwen2":
        return transformers.Qwen2Config(**SMALL, use_sliding_window=False)
    raise AssertionError(kind)


def _randomize(model, seed: int) -> None:
    """O(1) logits: weights ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.2), biases N(0, 0.2)
    (Qwen2's q/k/v biases included: they are zero after HF's init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def _build_hf(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _hf_config(kind)
    cls = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}.get(
        kind, transformers.LlamaForCausalLM)  # fmt: skip
    model = cls(cfg).eval()
    _randomize(model, seed)
    return model


def saved_models(tmp_path_factory, kinds, build, first_seed: int = 0) -> dict:
    """kind -> (HF fp32 model, HF fp64 copy, saved folder) for ``build(kind, seed=...)``."""
    out = {}
    for i, kind in enumerate(kinds):
        model = build(kind, seed=first_seed + i)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path, safe_serialization=True)
        out[kind] = (model, copy.deepcopy(model).double(), path)
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """kind -> (HF fp32 model, HF fp64 copy, saved folder); built once per module."""
    return saved_models(tmp_path_factory, KINDS, _build_hf)


# ---- driving DecoderModel --------------------------------------------------------------


def _slots(blocks, positions):
    return [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in positions]


def _prefill(lm: DecoderModel, kv, prompts, blocks) -> torch.Tensor:
    """Prompts packed along T (varlen); logits for all T rows."""
    ids, pos, slots, cu = [], [], [], [0]
    for p, b in zip(prompts, blocks):
        ids += p
        pos += range(len(p))
        slots += _slots(b, range(len(p)))
        cu.append(cu[-1] + len(p))
    step = Step(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.tensor(pos, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(map(len, prompts)),
    )
    with torch.no_grad():
        return lm.logits(lm.forward(step, kv))


def _decode(lm: DecoderModel, kv, tokens, positions, blocks) -> torch.Tensor:
    """One new token per sequence at the given positions; logits [B, V]."""
    width = max(map(len, blocks))
    table = torch.zeros(len(blocks), width, dtype=torch.int32)
    for r, b in enumerate(blocks):
        table[r, : len(b)] = torch.tensor(b, dtype=torch.int32)
    step = Step(
        input_ids=torch.tensor(tokens, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        slot_mapping=torch.tensor([_slots(b, [p])[0] for b, p in zip(blocks, positions)], dtype=torch.int64),
        block_table=table,
        seq_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32),
    )
    with torch.no_grad():
        return lm.logits(lm.forward(step, kv))


def _hf_logits(model, seqs) -> list[torch.Tensor]:
    """HF logits per sequence ([len, V]), one call each: with a sliding window a padded
    batch would put fully masked (NaN) rows into the later layers' values."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]


def _check(out: torch.Tensor, ref64: torch.Tensor, hf32: torch.Tensor, what: str) -> None:
    """The tolerance rule: |ringfuse - fp64| <= 2 |HF fp32 - fp64| (1e-5 floor)."""
    assert out.shape == ref64.shape, what
    assert torch.isfinite(out).all(), what
    err = (out.double() - ref64).abs().max().item()
    base = (hf32.double() - ref64).abs().max().item()
    assert err <= max(2 * base, 1e-5), f"{what}: max error {err:.3g} vs HF fp32's {base:.3g}"


def _prompts(seed, lengths, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _run_and_check(lm, hf32, hf64, what, lengths=(10,), decode_steps=3, check=_check):
    """Prefill the prompts (packed), decode ``decode_steps`` tokens for each, and compare every
    logit row with HF's logits for the full sequences."""
    prompts = _prompts(len(what), lengths)
    extra = _prompts(len(what) + 1, [decode_steps] * len(lengths))
    n_blocks = [-(-(n + decode_steps) // BLOCK) for n in lengths]
    # pages out of order and interleaved between the sequences
    order = torch.randperm(sum(n_blocks), generator=torch.Generator().manual_seed(1)).tolist()
    blocks, at = [], 0
    for nb in n_blocks:
        blocks.append(order[at : at + nb])
        at += nb
    kv = lm.new_kv_cache(sum(n_blocks) + 1, BLOCK)

    full = [p + e for p, e in zip(prompts, extra)]
    ref64, ref32 = _hf_logits(hf64, full), _hf_logits(hf32, full)
    out = _prefill(lm, kv, prompts, blocks)
    cu = np.cumsum([0, *lengths])
    for r, n in enumerate(lengths):
        check(out[cu[r] : cu[r + 1]], ref64[r][:n], ref32[r][:n], f"{what} prefill seq {r}")
    for s in range(decode_steps):
        positions = [n + s for n in lengths]
        out = _decode(lm, kv, [e[s] for e in extra], positions, blocks)
        for r, p in enumerate(positions):
            check(out[r], ref64[r][p], ref32[r][p], f"{what} decode step {s} seq {r}")


# ---- safetensors folders ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_prefill_and_decode(hf_models, kind):
    hf32, hf64, path = hf_models[kind]
    w = open_weights(path)
    cfg = w.config
    assert cfg.arch == {"mistral": "mistral", "qwen2": "qwen2"}.get(kind, "llama")
    assert cfg.tie_word_embeddings == (kind == "llama_tied")
    assert cfg.attention_bias == (kind in ("qwen2", "llama_bias"))
    assert cfg.o_proj_bias == cfg.mlp_bias == (kind == "llama_bias")
    assert (cfg.rope_scaling is not None) == (kind == "llama3_rope")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (4, 2, 16, 2)
    if kind == "llama_tied":
        assert not w.has("lm_head.weight")
    lm = DecoderModel(w)
    _run_and_check(lm, hf32, hf64, kind, lengths=(10,))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_folder_varlen_batch(hf_models, kind):
    """Two prompts of different lengths packed along T, then decoded together."""
    hf32, hf64, path = hf_models[kind]
    lm = DecoderModel(open_weights(path))
    _run_and_check(lm, hf32, hf64, kind + " varlen", lengths=(7, 12), decode_steps=2)


def test_llama3_rope_scaling_matters(hf_models):
    """The Llama 3.1 scaling is really applied: the same weights with plain RoPE differ."""
    import dataclasses

    w = open_weights(hf_models["llama3_rope"][2])
    inv_scaled = w.config.inv_freq()
    inv_plain = dataclasses.replace(w.config, rope_scaling=None).inv_freq()
    assert inv_scaled[0] == inv_plain[0]  # high frequency: kept
    assert torch.allclose(inv_scaled[-1], inv_plain[-1] / 8)  # low frequency: divided by the factor
    assert ((inv_scaled < inv_plain) & (inv_scaled > inv_plain / 8)).any()  # the smooth band


def test_sharded_checkpoint(hf_models, tmp_path):
    hf32, hf64, path = hf_models["llama"]
    hf32.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    w, ref = open_weights(tmp_path), open_weights(path)
    for name in ref.where:
        assert torch.equal(w.get(name), ref.get(name)), name
    assert torch.equal(w.get("model.layers.1.mlp.up_proj.weight", 0, 8, 40),
                       hf32.model.layers[1].mlp.up_proj.weight[8:40])  # fmt: skip
    assert torch.equal(w.get("model.layers.1.mlp.down_proj.weight", 1, 8, 40),
                       hf32.model.layers[1].mlp.down_proj.weight[:, 8:40])  # fmt: skip
    _run_and_check(DecoderModel(w), hf32, hf64, "sharded", decode_steps=1)


def _all_logits(lm, lengths=(10, 6)):
    prompts = _prompts(7, lengths)
    blocks = [[0, 1, 2], [3, 4]]
    return _prefill(lm, lm.new_kv_cache(5, BLOCK), prompts, blocks), prompts


def test_bf16_close_to_fp32(hf_models):
    hf32, hf64, path = hf_models["llama"]
    w = open_weights(path)
    out16, prompts = _all_logits(DecoderModel(w, dtype=torch.bfloat16))
    out32, _ = _all_logits(DecoderModel(w))
    assert out16.dtype == torch.float32 and torch.isfinite(out16).all()
    # the rule against HF's own bf16 run (reference: fp64), with slack for rounding luck
    ref64 = torch.cat(_hf_logits(hf64, prompts))
    hf16 = torch.cat(_hf_logits(copy.deepcopy(hf32).to(torch.bfloat16), prompts)).double()
    err, base = (out16.double() - ref64).abs().max().item(), (hf16 - ref64).abs().max().item()
    assert err <= 2 * base + 0.02, (err, base)
    assert (out16 - out32).abs().max() < 0.15 * out32.abs().max()
    assert (out16.argmax(-1) == out32.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("quant", ["w8a16", "w8a8"])
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "llama_bias"])
def test_int8_quant_close_to_fp32(hf_models, kind, quant):
    w = open_weights(hf_models[kind][2])
    outq, _ = _all_logits(DecoderModel(w, quant=quant))
    out32, _ = _all_logits(DecoderModel(w))
    assert outq.dtype == torch.float32 and torch.isfinite(outq).all()
    cos = torch.nn.functional.cosine_similarity(outq, out32, dim=-1)
    assert cos.min() > 0.99, cos
    assert (outq.argmax(-1) == out32.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("quant", ["none", "w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_from_row_blocks_equals_whole(quant, dtype):
    """The LM head is built from blocks of rows (never whole in fp32): the same weights and
    outputs as from the whole matrix."""
    from ringfuse.runtime.model import Linear

    w = torch.randn(70, 48, generator=torch.Generator().manual_seed(0))
    whole, blocks = Linear(w, None, quant, dtype), Linear(iter(w.split(32)), None, quant, dtype)
    assert (blocks.out_features, blocks.in_features) == (70, 48)
    for name in ("weight",) if quant == "none" else ("w_q", "w_scale"):
        assert torch.equal(getattr(whole, name), getattr(blocks, name)), name
    x = torch.randn(3, 48).to(dtype)
    assert torch.equal(whole(x), blocks(x))


def test_model_rejects_bad_dtype_and_quant(hf_models):
    w = open_weights(hf_models["llama"][2])
    with pytest.raises(ValueError, match="quant must be one of"):
        DecoderModel(w, quant="int4")
    with pytest.raises(ValueError, match="dtype must be"):
        DecoderModel(w, dtype=torch.float16)


# ---- Llama attention_bias / mlp_bias ---------------------------------------------------


def _bias_logits(lm):
    """Prefill logits of two packed prompts, then two decode steps' logits, in one tensor."""
    prompts, extra = _prompts(11, (10, 6)), _prompts(12, (2, 2))
    blocks = [[4, 0, 2, 7], [1, 5, 3]]  # 12 and 8 tokens in pages of 4, out of order
    kv = lm.new_kv_cache(8, BLOCK)
    out = [_prefill(lm, kv, prompts, blocks)]
    for s in range(2):
        out.append(_decode(lm, kv, [e[s] for e in extra], [len(p) + s for p in prompts], blocks))
    return torch.cat(out)


def test_biases_change_the_logits(hf_models):
    """The o_proj and gate/up/down biases are read and used: zeroing each set in the HF
    model moves its logits (so the HF-matched tests above would notice them dropped)."""
    hf32 = hf_models["llama_bias"][0]
    ids = torch.tensor([_prompts(3, (8,))[0]])
    ref = hf32(ids).logits
    for attr in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        model = copy.deepcopy(hf32)
        for layer in model.model.layers:
            layer.get_submodule(attr).bias.data.zero_()
        assert (model(ids).logits - ref).abs().max() > 0.05, attr


def test_biased_llama_greedy_tokens_match_hf(hf_models, tmp_path):
    """LLM on the biased Llama folder generates HF's greedy tokens."""
    hf32, _, path = hf_models["llama_bias"]
    check_greedy_tokens_match_hf(hf32, path, tmp_path)


def folder_with_tokenizer(path, tmp_path):
    """A copy of the model folder ``path`` in ``tmp_path`` with a word-level tokenizer.json
    (ids 0-127 as "w0".."w127"), which LLM needs to load it."""
    import shutil

    tokenizers = pytest.importorskip("tokenizers")
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


# HF's top-2 logit gap below which a different greedy token is a near-tie, not a bug: fp32
# runs differ in the last bits; bf16 runs round every activation to 8 bits (2^-8 relative)
NEAR_TIE = {"fp32": 1e-4, "bf16": 0.05}


def check_greedy_tokens_match_hf(hf32, path, tmp_path, device="cpu", dtype="fp32", **llm_kwargs):
    """LLM on a copy of the folder ``path`` (a word-level tokenizer.json beside it) generates
    HF's greedy tokens, decode graphs and all; a divergence is allowed only after a near-tie
    (NEAR_TIE). ``device``: where both run; ``dtype``: both in fp32 or both in bf16."""
    from ringfuse.runtime import LLM

    llm = LLM(folder_with_tokenizer(path, tmp_path), device=device, **{"dtype": dtype, "max_model_len": 64, "kv_cache_tokens": 256,
                                          "weight_cache": False, **llm_kwargs})
    prompts = _prompts(5, (9, 4))
    results = llm.generate(prompts, max_new_tokens=12, ignore_eos=True)
    hf = copy.deepcopy(hf32).to(device, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    for prompt, result in zip(prompts, results):
        assert_greedy_like_hf(hf, prompt, result.token_ids, device, dtype)
        assert len(result.token_ids) == 12


def assert_greedy_like_hf(hf, prompt, token_ids, device="cpu", dtype="fp32"):
    """token_ids are HF ``hf``'s greedy continuation of prompt, up to the first place where
    HF's top two logits are a near-tie (NEAR_TIE[dtype]); the rest is not compared."""
    ids = list(prompt)
    for got in token_ids:
        with torch.no_grad():
            logits = hf(torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
        top2 = logits.topk(2).values
        want = int(logits.argmax())
        if got != want:
            assert top2[0] - top2[1] < NEAR_TIE[dtype], (prompt, ids, got, want, top2)
            return
        ids.append(want)


def test_bos_token_outside_the_vocab_does_not_break_the_warm_up(hf_models, tmp_path):
    """A config's bos_token_id past the vocab (HF only warns): the warm-up prompt is the
    engine's own, so LLM() must not fail on it (it did, naming token ids no user gave)."""
    from ringfuse.runtime import LLM

    folder = folder_with_tokenizer(hf_models["llama"][2], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["bos_token_id"] = cfg["vocab_size"] + 72
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = LLM(folder, dtype="fp32", max_model_len=64, kv_cache_tokens=256, weight_cache=False)
    assert len(llm.generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3


def _tp_bias_worker(rank, world, path):
    import torch.distributed as dist

    lm = DecoderModel(open_weights(path), tp_group=dist.group.WORLD)
    layer = lm.layers[0]
    biases = {name: lin.bias is not None for name, lin in (("qkv", layer.qkv), ("o_proj", layer.o_proj),
                                                           ("gate_up", layer.mlp.gate_up), ("down", layer.mlp.down))}
    return _bias_logits(lm), biases


def test_biases_tensor_parallel(hf_models):
    """tp = 2: q/k/v and gate/up biases split with their rows; the row-parallel o_proj and
    down biases on rank 0 only, so the all-reduce adds them once: tp = 1's logits."""
    from tests.distributed.harness import run_ranks, values

    path = hf_models["llama_bias"][2]
    want = _bias_logits(DecoderModel(open_weights(path)))
    got = values(run_ranks(_tp_bias_worker, 2, str(path), timeout_s=300))
    for rank, (logits, biases) in enumerate(got):
        assert biases == {"qkv": True, "o_proj": rank == 0, "gate_up": True, "down": rank == 0}, rank
        assert torch.allclose(logits, want, atol=1e-5, rtol=0), (rank, (logits - want).abs().max())


@pytest.mark.parametrize("quant", ["none", "w8a16"])
def test_biases_through_the_converted_weights_cache(hf_models, tmp_path, quant):
    """The new biases are converted tensors like the weights: saved by weight_cache, mapped
    back to the same logits; a cache file without them (written before they were read) does
    not fit, so the engine converts again."""
    from ringfuse.runtime import weight_cache as wc

    w = open_weights(hf_models["llama_bias"][2])
    lm = DecoderModel(w, quant=quant)
    tensors = lm.converted_tensors()
    for name in ("qkv", "o_proj", "gate_up", "down"):
        assert tensors[f"layers.1.{name}.bias"].shape == (lm.linears[f"layers.1.{name}"].out_features,), name
    f = tmp_path / "cache.safetensors"
    assert wc.save(f, tensors)
    assert torch.equal(_bias_logits(DecoderModel(w, quant=quant, converted=wc.load(f))), _bias_logits(lm))
    stale = {k: v for k, v in tensors.items() if not k.endswith(".down.bias")}
    with pytest.raises(ValueError, match="layers.0.down: converted weights without a bias"):
        DecoderModel(w, quant=quant, converted=stale)


def test_a_missing_bias_is_zeros_as_in_hf(hf_models, tmp_path):
    """A bias the config declares but the file lacks: HF initializes it to zeros (and warns);
    so does ringfuse, instead of dropping the whole fused bias or failing."""
    from safetensors.torch import load_file, save_file

    hf32, hf64, path = hf_models["llama_bias"]
    sd = load_file(path / "model.safetensors")
    drop = "model.layers.1.mlp.up_proj.bias"
    del sd[drop]
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    ref32, ref64 = copy.deepcopy(hf32), copy.deepcopy(hf64)
    for m in (ref32, ref64):
        m.model.layers[1].mlp.up_proj.bias.data.zero_()
    _run_and_check(DecoderModel(open_weights(tmp_path)), ref32, ref64, "missing up bias", decode_steps=1)


# ---- tensor shapes against the config ----------------------------------------------------

SHAPE_CASES = [  # (kind, tensor, wrong shape, the config's shape)
    ("llama_tied", "model.embed_tokens.weight", (100, 64), (128, 64)),  # was an IndexError in generate
    ("llama", "model.embed_tokens.weight", (100, 64), (128, 64)),
    ("llama", "lm_head.weight", (128, 32), (128, 64)),
    ("llama", "model.norm.weight", (1, 64), (64,)),
    ("llama", "model.layers.0.input_layernorm.weight", (63,), (64,)),
    ("llama", "model.layers.1.post_attention_layernorm.weight", (96,), (64,)),
    ("llama", "model.layers.1.self_attn.q_proj.weight", (48, 64), (64, 64)),
    ("llama", "model.layers.0.self_attn.k_proj.weight", (64, 32), (32, 64)),
    ("llama", "model.layers.1.self_attn.v_proj.weight", (32, 63), (32, 64)),
    ("llama", "model.layers.0.self_attn.o_proj.weight", (64, 48), (64, 64)),
    ("llama", "model.layers.1.mlp.gate_proj.weight", (64, 96), (96, 64)),
    ("llama", "model.layers.0.mlp.up_proj.weight", (95, 64), (96, 64)),
    ("llama", "model.layers.1.mlp.down_proj.weight", (96, 64), (64, 96)),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias", (64,), (32,)),
    ("llama_bias", "model.layers.1.self_attn.q_proj.bias", (32,), (64,)),
    ("llama_bias", "model.layers.0.self_attn.o_proj.bias", (32,), (64,)),
    ("llama_bias", "model.layers.1.mlp.up_proj.bias", (64,), (96,)),
    ("llama_bias", "model.layers.0.mlp.down_proj.bias", (96,), (64,)),
]


@pytest.mark.parametrize("kind,name,bad,want", SHAPE_CASES, ids=[f"{c[0]}-{c[1]}" for c in SHAPE_CASES])
def test_tensor_shape_checked_at_load(hf_models, tmp_path, kind, name, bad, want):
    """Every tensor the model reads is checked against the config when the folder is opened:
    a ValueError naming it with both shapes, before any weight is converted."""
    from safetensors.torch import load_file, save_file

    path = hf_models[kind][2]
    sd = load_file(path / "model.safetensors")
    assert tuple(sd[name].shape) == want
    sd[name] = torch.zeros(bad)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    msg = f"tensor '{name}' has shape {list(bad)}, expected {list(want)}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        open_weights(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_non_float_weights_refused_at_load(hf_models, tmp_path, dtype):
    """An fp8 / int8 checkpoint without a quantization_config (or with one stripped) would be
    read as raw numbers: refused at load, naming the tensor and its dtype."""
    from safetensors.torch import load_file, save_file

    path = hf_models["llama"][2]
    sd = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = sd[name].clamp(-1, 1).to(dtype)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    with pytest.raises(ValueError, match=re.escape(f"tensor '{name}' is {'F8_E4M3' if dtype.is_floating_point else 'I8'}")):
        open_weights(tmp_path)


def test_float64_weights_load(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    path = hf_models["llama"][2]
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].double()
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    assert open_weights(tmp_path).get("model.layers.0.mlp.up_proj.weight").dtype == torch.float64


def test_missing_weight_checked_at_load(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    path = hf_models["llama"][2]
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    with pytest.raises(ValueError, match=re.escape("missing tensor 'model.layers.1.mlp.up_proj.weight' (expected "
                                                   "shape [96, 64])")):  # fmt: skip
        open_weights(tmp_path)


@pytest.mark.parametrize("kind,name,bad,want", [
    ("llama_tied", "token_embd.weight", (100, 64), (128, 64)),
    ("llama", "blk.1.ffn_down.weight", (96, 64), (64, 96)),
    ("llama_bias", "blk.0.attn_output.bias", (32,), (64,)),
])  # fmt: skip
@needs_gguf
def test_gguf_tensor_shape_checked_at_load(hf_models, tmp_path, kind, name, bad, want):
    import types

    hf = hf_models[kind][0]
    gguf_name = {v: k for k, v in _LAYER_NAMES.items()}.get(name.split(".", 2)[-1])
    hf_name = "model.embed_tokens.weight" if gguf_name is None else f"model.layers.{name.split('.')[1]}.{gguf_name}"
    sd = dict(hf.state_dict())
    sd[hf_name] = torch.zeros(bad)
    p = tmp_path / "bad.gguf"
    _write_gguf(p, types.SimpleNamespace(config=hf.config, state_dict=lambda: sd))
    msg = f"tensor '{hf_name}' has shape {list(bad)}, expected {list(want)}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        open_weights(p)


# ---- error cases -----------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_weights(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        open_weights(tmp_path)


def _write_config(folder, **overrides):
    cfg = {**_hf_config("llama").to_dict(), "architectures": ["LlamaForCausalLM"], **overrides}
    (folder / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_folder_without_safetensors(tmp_path):
    _write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        open_weights(tmp_path)


def test_corrupt_safetensors(tmp_path):
    _write_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        open_weights(tmp_path)


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        open_weights(tmp_path)


def test_unsupported_hf_architecture(tmp_path):
    _write_config(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        open_weights(tmp_path)


def test_config_without_architectures_uses_model_type(hf_models, tmp_path):
    import shutil

    src = hf_models["qwen2"][2]
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert open_weights(tmp_path).config == open_weights(src).config
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        open_weights(tmp_path)


def test_config_missing_key(tmp_path):
    cfg = _write_config(tmp_path)
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing key 'intermediate_size'"):
        open_weights(tmp_path)


def test_unsupported_rope_scaling(tmp_path):
    _write_config(tmp_path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        open_weights(tmp_path)


def test_missing_tensor(hf_models):
    w = open_weights(hf_models["llama"][2])
    with pytest.raises(ValueError, match="no tensor 'model.layers.9.mlp.up_proj.weight'"):
        w.get("model.layers.9.mlp.up_proj.weight")


@needs_gguf
def test_garbage_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        open_weights(p)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        open_weights(p)


@needs_gguf
def test_gguf_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    _finish(w)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        open_weights(p)


@needs_gguf
def test_gguf_missing_metadata(tmp_path, hf_models):
    p = tmp_path / "m.gguf"
    _write_gguf(p, hf_models["llama"][0], skip_keys={"block_count"})
    with pytest.raises(ValueError, match="missing metadata key 'llama.block_count'"):
        open_weights(p)


# ---- GGUF ------------------------------------------------------------------------------

_LAYER_NAMES = {  # HF suffix -> GGUF name in block N
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: per head, rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama3_rope_factors(cfg) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf rope_freqs for "llama3" scaling (theta = pos * inv / factor)."""
    s, d = LLAMA3_ROPE, cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])  # fmt: skip
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def _write_gguf(path, model, arch="llama", quant=None, skip_keys=(), rope_freqs=False):
    """A GGUF as llama.cpp's converter writes it: F32 tensors (those in ``quant``: name ->
    GGMLQuantizationType quantized), q/k rows permuted for arch llama."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": heads,
        "attention.head_count_kv": kv_heads,
        "rope.dimension_count": cfg.hidden_size // heads,
    }
    for key, value in keys.items():
        if key not in skip_keys:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for suffix, name in _LAYER_NAMES.items():
            t = sd.get(f"model.layers.{i}.{suffix}")
            if t is None:
                continue
            if arch == "llama" and suffix.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                t = _llama_cpp_permute(t, heads if "q_proj" in suffix else kv_heads)
            tensors[f"blk.{i}.{name}"] = t
    if rope_freqs:
        tensors["rope_freqs.weight"] = _llama3_rope_factors(cfg)
    for name, t in tensors.items():
        qtype = (quant or {}).get(name)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    _finish(w)
    return tensors


@pytest.fixture(scope="module")
def llama_gguf(hf_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "llama.gguf"
    _write_gguf(path, hf_models["llama"][0])
    return path


@needs_gguf
def test_gguf_config(llama_gguf, hf_models):
    w = open_weights(llama_gguf)
    ref = open_weights(hf_models["llama"][2]).config
    assert w.config.arch == "llama" and w.config.rope_scaling is None
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings", "tie_word_embeddings", "attention_bias"):  # fmt: skip
        assert getattr(w.config, field) == getattr(ref, field), field
    assert w.config.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert w.config.eos_token_ids == (2,) and w.config.bos_token_id == 1


@needs_gguf
def test_gguf_tensors_equal_hf(llama_gguf, hf_models):
    hf = hf_models["llama"][0]
    w = open_weights(llama_gguf)
    D = 16
    for i in range(2):
        attn = hf.model.layers[i].self_attn
        for name, ref in (("q_proj", attn.q_proj.weight), ("k_proj", attn.k_proj.weight)):
            full = f"model.layers.{i}.self_attn.{name}.weight"
            assert torch.equal(w.get(full), ref), full
            # whole-head row slices (what a tensor-parallel rank reads)
            for h0, h1 in ((0, 1), (1, 2), (0, 2)):
                assert torch.equal(w.get(full, 0, h0 * D, h1 * D), ref[h0 * D : h1 * D]), (full, h0, h1)
            for c0, c1 in ((0, 32), (5, 41), (40, None)):
                assert torch.equal(w.get(full, 1, c0, c1), ref[:, c0:c1]), (full, c0, c1)
        down = hf.model.layers[i].mlp.down_proj.weight
        assert torch.equal(w.get(f"model.layers.{i}.mlp.down_proj.weight", 1, 3, 50), down[:, 3:50])
        assert torch.equal(w.get(f"model.layers.{i}.mlp.down_proj.weight", 0, 3, 50), down[3:50])
    assert torch.equal(w.get("lm_head.weight"), hf.lm_head.weight)
    assert torch.equal(w.get("model.norm.weight"), hf.model.norm.weight)
    assert torch.equal(w.get("model.embed_tokens.weight", 0, 10, 20), hf.model.embed_tokens.weight[10:20])


@needs_gguf
def test_gguf_logits_match_hf(llama_gguf, hf_models):
    hf32, hf64, _ = hf_models["llama"]
    _run_and_check(DecoderModel(open_weights(llama_gguf)), hf32, hf64, "gguf llama", lengths=(10, 5))


@pytest.mark.parametrize("kind", ["qwen2", "llama_tied", "llama_bias"])
@needs_gguf
def test_gguf_other_models(hf_models, tmp_path, kind):
    """Qwen2 (arch qwen2: no q/k permutation, q/k/v biases), tied embeddings (no output.weight)
    and arch llama with every bias (q/k biases interleaved like their rows, as llama.cpp's
    converter writes them)."""
    hf32, hf64, _ = hf_models[kind]
    path = tmp_path / f"{kind}.gguf"
    _write_gguf(path, hf32, arch="qwen2" if kind == "qwen2" else "llama")
    w = open_weights(path)
    assert w.config.attention_bias == (kind in ("qwen2", "llama_bias"))
    assert w.config.o_proj_bias == w.config.mlp_bias == (kind == "llama_bias")
    assert w.config.tie_word_embeddings == (kind == "llama_tied")
    _run_and_check(DecoderModel(w), hf32, hf64, f"gguf {kind}", decode_steps=1)


@needs_gguf
def test_gguf_llama3_rope_freqs(hf_models, tmp_path):
    """Llama 3.1 GGUFs carry the RoPE scaling as a rope_freqs tensor, not as metadata."""
    hf32, hf64, _ = hf_models["llama3_rope"]
    path = tmp_path / "llama3.gguf"
    _write_gguf(path, hf32, rope_freqs=True)
    w = open_weights(path)
    ref = open_weights(hf_models["llama3_rope"][2]).config
    assert torch.allclose(w.config.inv_freq(), ref.inv_freq(), rtol=1e-6, atol=0)
    _run_and_check(DecoderModel(w), hf32, hf64, "gguf llama3 rope", decode_steps=1)


@pytest.mark.parametrize("factors,match", [
    (np.ones(5), "rope_freqs.weight has 5 values"),
    (np.zeros(8), r"must hold positive finite factors, got \[0.0, 0.0"),  # every logit NaN, token 0 out
    (np.array([1.0] * 7 + [np.nan]), "must hold positive finite factors, got \\[nan\\]"),
])  # fmt: skip
@needs_gguf
def test_gguf_bad_rope_freqs(hf_models, tmp_path, factors, match):
    path = tmp_path / "bad.gguf"
    hf = hf_models["llama"][0]
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 128), ("embedding_length", 64), ("block_count", 2),
                       ("feed_forward_length", 96), ("attention.head_count", 4), ("vocab_size", 128)):  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tensor("token_embd.weight", hf.model.embed_tokens.weight.detach().numpy())
    w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    _finish(w)
    with pytest.raises(ValueError, match=match):
        open_weights(path)


@pytest.mark.parametrize("align", [0, 7, 12])
@needs_gguf
def test_gguf_alignment_must_be_a_multiple_of_8(tmp_path, align):
    """The GGUF spec asks for a multiple of 8; 7 was taken and read the tensors at offsets
    the writer never used (garbage output)."""
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("general.alignment", align)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    _finish(w)
    with pytest.raises(ValueError, match=f"general.alignment must be a positive multiple of 8, got {align}"):
        open_weights(path)


@needs_gguf
def test_gguf_q8_0_slices(hf_models, tmp_path):
    hf = hf_models["llama"][0]
    Q8 = gguf.GGMLQuantizationType.Q8_0
    path = tmp_path / "q8.gguf"
    quant = {"blk.0.ffn_down.weight": Q8, "blk.1.attn_q.weight": Q8, "blk.1.ffn_gate.weight": Q8}
    written = _write_gguf(path, hf, quant=quant)
    w = open_weights(path)

    name = "model.layers.0.mlp.down_proj.weight"  # [64, 96]: 3 blocks of 32 per row
    full = w.get(name)
    deq = gguf.quants.dequantize(gguf.quants.quantize(written["blk.0.ffn_down.weight"], Q8), Q8)
    assert torch.equal(full, torch.from_numpy(deq))
    ref = hf.model.layers[0].mlp.down_proj.weight
    assert (full - ref).abs().max() <= ref.abs().max() / 127  # Q8_0: 1/254 of each block's max, at most
    for c0, c1 in ((0, 32), (32, 96), (64, None), (0, None)):  # block-aligned: cut before dequantizing
        assert torch.equal(w.get(name, 1, c0, c1), full[:, c0:c1]), (c0, c1)
    for c0, c1 in ((5, 40), (31, 33), (50, None), (0, 48)):  # not aligned
        assert torch.equal(w.get(name, 1, c0, c1), full[:, c0:c1]), (c0, c1)
    for r0, r1 in ((0, 10), (17, 64)):
        assert torch.equal(w.get(name, 0, r0, r1), full[r0:r1]), (r0, r1)

    # a quantized permuted tensor: unpermuted after dequantizing, whole-head row slices too
    q = w.get("model.layers.1.self_attn.q_proj.weight")
    q_ref = hf.model.layers[1].self_attn.q_proj.weight
    assert (q - q_ref).abs().max() <= q_ref.abs().max() / 127
    assert torch.equal(w.get("model.layers.1.self_attn.q_proj.weight", 0, 16, 48), q[16:48])
    assert torch.equal(w.get("model.layers.1.self_attn.q_proj.weight", 1, 32, 64), q[:, 32:64])

    # and the model runs on it, close to the fp32 logits
    lm, lm32 = DecoderModel(w), DecoderModel(open_weights(hf_models["llama"][2]))
    out, out32 = _all_logits(lm)[0], _all_logits(lm32)[0]
    assert torch.nn.functional.cosine_similarity(out, out32, dim=-1).min() > 0.99


@needs_gguf
def test_gguf_bf16_and_f16_slices(hf_models, tmp_path):
    """BF16 tensors are stored as bytes by the gguf reader: column slices must count bytes."""
    hf = hf_models["llama"][0]
    BF16, F16 = gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F16
    path = tmp_path / "half.gguf"
    _write_gguf(path, hf, quant={"blk.0.ffn_up.weight": BF16, "blk.0.ffn_gate.weight": F16,
                                 "blk.1.attn_k.weight": BF16, "output_norm.weight": BF16})  # fmt: skip
    w = open_weights(path)
    up = hf.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16)
    gate = hf.model.layers[0].mlp.gate_proj.weight.half()
    k = hf.model.layers[1].self_attn.k_proj.weight.to(torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    assert w.get(name).dtype == torch.bfloat16
    assert torch.equal(w.get(name), up)
    assert torch.equal(w.get(name, 0, 3, 9), up[3:9])
    assert torch.equal(w.get(name, 1, 3, 41), up[:, 3:41])
    assert torch.equal(w.get("model.layers.0.mlp.gate_proj.weight", 1, 3, 41), gate[:, 3:41])
    assert torch.equal(w.get("model.layers.1.self_attn.k_proj.weight"), k)
    assert torch.equal(w.get("model.layers.1.self_attn.k_proj.weight", 1, 7, 30), k[:, 7:30])
    assert torch.equal(w.get("model.norm.weight"), hf.model.norm.weight.to(torch.bfloat16))
    # the model runs on BF16 / F16 tensors (upcast to fp32) close to the fp32 logits
    out, out32 = _all_logits(DecoderModel(w))[0], _all_logits(DecoderModel(open_weights(hf_models["llama"][2])))[0]
    assert torch.nn.functional.cosine_similarity(out, out32, dim=-1).min() > 0.999


# ---- GGUF header reader ------------------------------------------------------------------


@needs_gguf
def test_gguf_header_matches_gguf_reader(llama_gguf, tmp_path):
    """read_gguf_header gives what gguf.GGUFReader gives: every metadata value type (scalars,
    strings, arrays of numbers, of strings and of arrays) and every tensor's place."""
    from ringfuse.runtime.weights import read_gguf_header

    p = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -100), w.add_uint16("t.u16", 60000), w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000), w.add_int32("t.i32", -2_000_000_000), w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63), w.add_int64("t.i64", -(2**62)), w.add_float64("t.f64", 0.1), w.add_bool("t.b", True)
    w.add_string("t.s", "héllo ✓"), w.add_array("t.ai", [1, -2, 3]), w.add_array("t.af", [0.5, 1.5])
    w.add_array("t.as", ["a", "", "ü"]), w.add_array("t.aa", [[1, 2], [3]]), w.add_array("t.empty", [])
    w.add_tensor("a.weight", np.arange(96, dtype=np.float32).reshape(3, 32))
    w.add_tensor("b.weight", gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    _finish(w)
    for path in (p, llama_gguf):
        reader = gguf.GGUFReader(path)
        metadata, tensors = read_gguf_header(path)
        expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        if path == p:  # GGUFReader flattens nested arrays; the header reader keeps them nested
            assert metadata.pop("t.aa") == [[1, 2], [3]]
            expected.pop("t.aa")
        assert {k: v for k, v in metadata.items() if not k.startswith("GGUF.")} == expected
        assert all(type(metadata[k]) is type(v) for k, v in expected.items())
        assert [(t.name, t.qtype, t.shape, t.offset, t.n_bytes) for t in tensors] == [
            (t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape)), t.data_offset, t.n_bytes)
            for t in reader.tensors]  # fmt: skip


@needs_gguf
def test_gguf_truncated_or_foreign(llama_gguf, tmp_path):
    data = llama_gguf.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) - 100])  # the last tensor's bytes cut short
    with pytest.raises(ValueError, match=r"not a readable GGUF.*runs past the end of the file"):
        open_weights(p)
    p.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(ValueError, match=r"not a readable GGUF.*past the end of the file"):
        open_weights(p)
    p.write_bytes(data[:4] + (3 << 24).to_bytes(4, "little") + data[8:])  # version 3, big-endian
    with pytest.raises(ValueError, match="big-endian GGUF files are not supported"):
        open_weights(p)
    p.write_bytes(data[:4] + (1).to_bytes(4, "little") + data[8:])
    with pytest.raises(ValueError, match=r"GGUF version 1 \(2 or 3 supported\)"):
        open_weights(p)
