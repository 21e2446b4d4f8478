"""The architecture registry and the families beyond Llama's block: Qwen3 (per-head q/k
RMSNorm, an explicit head_dim) and Gemma 2 (norms around each sublayer, 1 + w norm weights,
scaled embeddings, GeGLU, query_pre_attn_scalar, attention and final-logit soft-capping,
sliding-window layers), and sliding windows in Mistral and Qwen2. Tiny random-weight HF models, saved as safetensors folders and written as
GGUF files the way llama.cpp's converter writes them, are run by ``DecoderModel`` and by
``LLM``; logits and greedy tokens are checked against HF transformers (eager attention),
with the tolerance rule of test_weights."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
try:
    import gguf
except ImportError:  # the GPU machine's image has no gguf: only the tests that write GGUF files skip
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package")

from ringfuse.runtime import architectures  # noqa: E402
from ringfuse.runtime.config import ModelConfig  # noqa: E402
from ringfuse.runtime.model import DecoderModel  # noqa: E402
from ringfuse.runtime.model_runner import DecodeGraph  # noqa: E402
from ringfuse.runtime.weights import open_weights  # noqa: E402

from .test_weights import (  # noqa: E402
    _LAYER_NAMES,
    SMALL,
    _all_logits,
    _bias_logits,
    _finish,
    _prompts,
    _randomize,
    _run_and_check,
    check_greedy_tokens_match_hf,
    saved_models,
)

# soft caps small enough to bite on O(1) scores and logits; windows shorter than the prompts
GEMMA2 = dict(SMALL, head_dim=16, attn_logit_softcapping=1.5, final_logit_softcapping=2.0, sliding_window=4)
KINDS = {
    # head_dim 24 != hidden / heads = 16: the explicit head_dim is read
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(SMALL, head_dim=24)),
    "qwen3_bias": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   dict(SMALL, head_dim=24, attention_bias=True)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(GEMMA2, query_pre_attn_scalar=20)),
    # llama.cpp scales Gemma 2's queries by key_length^-1/2: the GGUF test's model has that
    "gemma2_gguf": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                    dict(GEMMA2, query_pre_attn_scalar=16, tie_word_embeddings=False)),
    # every layer slides (Mistral); only layers >= max_window_layers do (Qwen2)
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(SMALL, sliding_window=5)),
    "qwen2_window": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(SMALL, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
}  # fmt: skip


def _build(kind: str, seed: int):
    config_cls, model_cls, kw = KINDS[kind]
    torch.manual_seed(seed)
    cfg = config_cls(**kw)
    cfg._attn_implementation = "eager"  # HF's sdpa path ignores Gemma 2's soft cap
    model = model_cls(cfg).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (HF fp32 model, HF fp64 copy, saved folder)."""
    return saved_models(tmp_path_factory, KINDS, _build, first_seed=100)


def test_registry_answers_for_every_family():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2"} <= architectures.REGISTRY.keys()
    for name, cls in architectures.REGISTRY.items():
        assert cls.name == name and cls.hf_classes, name
        assert all(architectures.for_hf([a], None) is cls for a in cls.hf_classes)
        if cls.gguf_name:
            assert architectures.for_gguf(cls.gguf_name) is cls
    assert architectures.for_hf([], "qwen3") is architectures.REGISTRY["qwen3"]
    assert architectures.for_hf(["GPTNeoXForCausalLM"], "gpt_neox") is None


def test_configs(models):
    q = open_weights(models["qwen3"][2]).config
    assert (q.arch, q.head_dim, q.attention_bias, q.o_proj_bias, q.attn_softcap) == ("qwen3", 24, False, False, None)
    qb = open_weights(models["qwen3_bias"][2]).config
    assert qb.attention_bias and qb.o_proj_bias and not qb.mlp_bias
    g = open_weights(models["gemma2"][2]).config
    assert (g.arch, g.attn_softcap, g.final_softcap, g.tie_word_embeddings) == ("gemma2", 1.5, 2.0, True)
    assert g.attn_scale == pytest.approx(20**-0.5)
    # the even layers slide (HF's default layer_types); the context is not capped by the window
    assert g.layer_windows == (4, 0) and g.max_position_embeddings == 128
    assert open_weights(models["mistral_window"][2]).config.layer_windows == (5, 5)
    assert open_weights(models["qwen2_window"][2]).config.layer_windows == (0, 3)
    assert q.layer_windows == ()


@pytest.mark.parametrize("arch, extra, want", [
    ("Qwen2ForCausalLM", {"sliding_window": 8}, ()),  # use_sliding_window false: HF drops the window
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}, (0, 0, 8)),
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, (8, 8, 8)),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8,
                          "layer_types": ["full_attention", "sliding_attention", "full_attention"]}, (0, 8, 0)),
    ("Gemma2ForCausalLM", {}, (4096, 0, 4096)),  # HF's default window
    ("Gemma2ForCausalLM", {"sliding_window": None}, ()),
    ("Gemma2ForCausalLM", {"sliding_window": 16, "layer_types": ["full_attention"] * 3}, (0, 0, 0)),
    ("MistralForCausalLM", {"sliding_window": 16}, (16, 16, 16)),
    ("MistralForCausalLM", {"sliding_window": None}, ()),
    ("MistralForCausalLM", {}, (4096, 4096, 4096)),  # no key: MistralConfig's default window
    ("LlamaForCausalLM", {"sliding_window": 16}, ()),  # HF's Llama has no window
])  # fmt: skip
def test_layer_windows_from_hf_configs(arch, extra, want):
    cfg = dict(SMALL, num_hidden_layers=3, architectures=[arch], **extra)
    assert ModelConfig.from_hf(cfg, "config.json").layer_windows == want


@pytest.mark.parametrize("extra, match", [
    ({"sliding_window": 0}, "sliding_window must be a positive int"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must list 3 entries"),
    ({"layer_types": ["sliding_attention", "full_attention", "chunked_attention"]}, "layer_types must list"),
    ({"layer_types": "sliding_attention"}, "layer_types must list"),
])  # fmt: skip
def test_bad_layer_windows_are_refused(extra, match):
    cfg = dict(SMALL, num_hidden_layers=3, architectures=["Gemma2ForCausalLM"], **extra)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg, "config.json")


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_hf(models, kind):
    """Prefill (two prompts packed) and decode steps, every logit row against HF."""
    hf32, hf64, path = models[kind]
    lm = DecoderModel(open_weights(path))
    _run_and_check(lm, hf32, hf64, kind, lengths=(10, 5), decode_steps=3)


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "mistral_window"])
def test_greedy_tokens_match_hf(models, kind, tmp_path):
    hf32, _, path = models[kind]
    check_greedy_tokens_match_hf(hf32, path, tmp_path)


@pytest.mark.parametrize("change", ["softcaps", "scalar", "post_norms", "embed_scale", "qk_norm", "window"])
def test_each_feature_changes_the_logits(models, change):
    """Every feature the new blocks add moves HF's logits on these models, so the HF-matched
    tests above would catch ringfuse dropping it."""
    kind = "qwen3" if change == "qk_norm" else "gemma2"
    hf32 = models[kind][0]
    ids = torch.tensor([_prompts(3, (12,))[0]])
    with torch.no_grad():
        ref = hf32(ids).logits
        model = copy.deepcopy(hf32)
        if change == "softcaps":
            model.config.attn_logit_softcapping = model.config.final_logit_softcapping = None
            for layer in model.model.layers:
                layer.self_attn.attn_logit_softcapping = None
        elif change == "scalar":
            for layer in model.model.layers:
                layer.self_attn.scaling = model.config.head_dim**-0.5
        elif change == "post_norms":
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight.zero_()  # scale 1 + 0
                layer.post_feedforward_layernorm.weight.zero_()
        elif change == "window":  # the context fits the window: whole-context attention
            model.config.sliding_window = 1000
            for layer in model.model.layers:
                if layer.self_attn.sliding_window is not None:
                    layer.self_attn.sliding_window = 1000
        elif change == "embed_scale":
            model.model.embed_tokens.weight.mul_(model.config.hidden_size**-0.5)
            model.model.normalizer = torch.tensor(1.0)
        else:
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.fill_(1.0)
                layer.self_attn.k_norm.weight.fill_(1.0)
        assert (model(ids).logits - ref).abs().max() > 0.05, change


@pytest.mark.parametrize("kind", ["qwen3", "gemma2"])
def test_bf16_and_int8_close_to_fp32(models, kind):
    w = open_weights(models[kind][2])
    out32, _ = _all_logits(DecoderModel(w))
    for dtype, quant in ((torch.bfloat16, "none"), (torch.float32, "w8a16"), (torch.float32, "w8a8")):
        out, _ = _all_logits(DecoderModel(w, dtype=dtype, quant=quant))
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), (dtype, quant)
        cos = torch.nn.functional.cosine_similarity(out, out32, dim=-1)
        assert cos.min() > 0.99, (dtype, quant, cos.min())


def _decode_step(lm, kv, batch: int):
    from ringfuse.runtime.model import Step

    table = torch.arange(batch * 2, dtype=torch.int32).view(batch, 2)  # two pages of 4 each
    pos = torch.tensor([3 + r for r in range(batch)], dtype=torch.int64)
    return Step(input_ids=torch.tensor(_prompts(9, (batch,))[0]), positions=pos,
                slot_mapping=table[torch.arange(batch), pos // 4].long() * 4 + pos % 4, block_table=table,
                seq_lens=(pos + 1).to(torch.int32))  # fmt: skip


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["qwen3", "gemma2"])
def test_decode_graph_equals_eager(models, kind, batch):
    """Every op of these blocks is a ringfuse kernel (Qwen3's per-head q/k norms: one per head
    when a batch's rows are strided; Gemma 2's GeGLU, extra norms and soft caps), so a decode
    step captures as a CPU graph and replays with eager's bits."""
    lm = DecoderModel(open_weights(models[kind][2]))
    kv = lm.new_kv_cache(2 * batch, 4)
    for k in kv.k + kv.v:
        k.normal_()
    step = _decode_step(lm, kv, batch)
    with torch.no_grad():
        graph = DecodeGraph(lm, kv, batch, 2)
        first = graph.run(step).clone()  # captured while running
        again = graph.run(step)  # replayed (the same slot is written again: same inputs)
        eager = lm.logits(lm.forward(step, kv))
    assert graph.graph.calls
    assert torch.equal(first, eager) and torch.equal(again, eager)


def _tp_worker(rank, world, path):
    import torch.distributed as dist

    return _bias_logits(DecoderModel(open_weights(path), tp_group=dist.group.WORLD))


@pytest.mark.parametrize("kind", ["qwen3_bias", "gemma2"])
def test_tensor_parallel_equals_one_rank(models, kind):
    from tests.distributed.harness import run_ranks, values

    path = models[kind][2]
    want = _bias_logits(DecoderModel(open_weights(path)))
    for rank, logits in enumerate(values(run_ranks(_tp_worker, 2, str(path), timeout_s=300))):
        assert torch.allclose(logits, want, atol=1e-5, rtol=0), (rank, (logits - want).abs().max())


# ---- GGUF, as llama.cpp's convert_hf_to_gguf writes these architectures ----------------

_OWN_NAMES = {
    "qwen3": {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"},
    "gemma2": {"post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
}  # fmt: skip


def _write_gguf(path, model, arch: str, gemma2_keys: bool = True):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
                       "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
                       "attention.head_count": cfg.num_attention_heads,
                       "attention.head_count_kv": cfg.num_key_value_heads, "attention.key_length": cfg.head_dim,
                       "attention.value_length": cfg.head_dim, "vocab_size": cfg.vocab_size}.items():  # fmt: skip
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if arch == "gemma2" and gemma2_keys:
        w.add_float32("gemma2.attn_logit_softcapping", cfg.attn_logit_softcapping)
        w.add_float32("gemma2.final_logit_softcapping", cfg.final_logit_softcapping)
        w.add_uint32("gemma2.attention.sliding_window", cfg.sliding_window)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    names = {**_LAYER_NAMES, **_OWN_NAMES[arch]}
    for i in range(cfg.num_hidden_layers):
        for suffix, name in names.items():
            if f"model.layers.{i}.{suffix}" in sd:
                tensors[f"blk.{i}.{name}"] = sd[f"model.layers.{i}.{suffix}"]
    for name, t in tensors.items():
        if arch == "gemma2" and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp's converter stores Gemma's norm scale 1 + w
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    _finish(w)


@pytest.mark.parametrize("kind", ["qwen3_bias", "gemma2_gguf"])
@needs_gguf
def test_gguf_logits_match_hf(models, tmp_path, kind):
    arch = kind.split("_")[0]
    hf32, hf64, _ = models[kind]
    path = tmp_path / f"{kind}.gguf"
    _write_gguf(path, hf32, arch)
    w = open_weights(path)
    assert w.config.arch == arch and w.config.head_dim == hf32.config.head_dim
    if arch == "gemma2":
        assert (w.config.attn_softcap, w.config.final_softcap, w.config.max_position_embeddings) == (1.5, 2.0, 128)
        assert w.config.layer_windows == (4, 0)  # llama.cpp's pattern: the even layers slide
        assert w.config.attn_scale == pytest.approx(16**-0.5) and not w.config.tie_word_embeddings
    _run_and_check(DecoderModel(w), hf32, hf64, f"gguf {kind}", lengths=(10, 5), decode_steps=2)


@needs_gguf
def test_gemma2_gguf_without_its_keys_gets_llama_cpps_defaults(models, tmp_path):
    """llama.cpp reads the soft caps and the window as optional keys with Gemma 2's values as
    defaults (50, 30, 4096); a file without them must not run uncapped and unwindowed."""
    path = tmp_path / "gemma2.gguf"
    _write_gguf(path, models["gemma2_gguf"][0], "gemma2", gemma2_keys=False)
    cfg = open_weights(path).config
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.layer_windows) == (50.0, 30.0, (4096, 0))


# ---- configs refused ------------------------------------------------------------------


@pytest.mark.parametrize("key, value, match", [
    ("hidden_activation", "relu", "unsupported hidden_activation 'relu'"),
    ("attn_logit_softcapping", -1.0, "attn_logit_softcapping must be a positive finite number"),
    ("final_logit_softcapping", "30", "final_logit_softcapping must be a positive finite number"),
    ("query_pre_attn_scalar", 0, "query_pre_attn_scalar must be a positive finite number"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention is not supported"),
])  # fmt: skip
def test_gemma2_bad_config(key, value, match):
    cfg = transformers.Gemma2Config(**GEMMA2).to_dict()
    cfg.update({key: value, "architectures": ["Gemma2ForCausalLM"]})
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg, "config.json")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_an_activation_other_than_silu_is_refused(arch):
    """hidden_act was not read: a relu or gelu Llama-family config ran with SiLU."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4).to_dict()  # fmt: skip
    cfg["architectures"] = [arch]
    ModelConfig.from_hf(dict(cfg, hidden_act="swish"), "config.json")  # SiLU's other name
    for act in ("relu", "gelu"):
        with pytest.raises(ValueError, match=f"unsupported hidden_act '{act}' \\(supported: silu, swish\\)"):
            ModelConfig.from_hf(dict(cfg, hidden_act=act), "config.json")


@needs_gguf
def test_missing_qk_norm_is_refused_at_load(models, tmp_path):
    hf = models["qwen3"][0]
    sd = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.self_attn.k_norm.weight"}
    path = tmp_path / "no_k_norm.gguf"
    _write_gguf(path, types.SimpleNamespace(config=hf.config, state_dict=lambda: sd), "qwen3")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.k_norm.weight'"):
        open_weights(path)


@pytest.mark.parametrize("kind", ["qwen3", "gemma2"])
def test_converted_weights_round_trip(models, kind):
    """The blocks' own tensors (q/k norms, the extra norms with their 1 + w folded in) are
    converted tensors too: a model rebuilt from them gives the same bits; one missing is refused."""
    w = open_weights(models[kind][2])
    lm = DecoderModel(w, quant="w8a16")
    tensors = lm.converted_tensors()
    own = "layers.1.k_norm" if kind == "qwen3" else "layers.1.post_ffn_norm"
    assert own in tensors
    assert torch.equal(_bias_logits(DecoderModel(w, quant="w8a16", converted=tensors)), _bias_logits(lm))
    with pytest.raises(ValueError, match=own):
        DecoderModel(w, quant="w8a16", converted={k: v for k, v in tensors.items() if k != own})
