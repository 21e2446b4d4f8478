"""The converted-weights cache: the first load writes this rank's converted tensors, later
loads map them and give bitwise the same logits; a changed source, other options, a torn or
misfit file and weight_cache=False are handled."""

import os

import pytest
import torch

from ringfuse.runtime import LLM
from ringfuse.runtime import weight_cache as wc

pytest.importorskip("gguf")
PROMPT = [1, 504, 3337, 28, 940, 314, 253, 1345, 30]  # token ids: no chat template needed


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RINGFUSE_CACHE", str(tmp_path))
    return tmp_path / "converted"


def _logits(llm):
    return llm.generate([PROMPT], max_new_tokens=6, ignore_eos=True)[0].token_ids, llm.model.logits(
        llm.model.forward(_step(len(PROMPT)), llm.model.new_kv_cache(1, 16)))


def _step(T):
    from ringfuse.runtime.model import Step

    return Step(input_ids=torch.tensor(PROMPT), positions=torch.arange(T), slot_mapping=torch.arange(T),
                cu_seqlens=torch.tensor([0, T], dtype=torch.int32), max_seqlen=T)  # fmt: skip


@pytest.mark.parametrize("quant", ["none", "w8a16"])
def test_second_load_maps_the_cache_with_the_same_bits(default_gguf_path, cache_root, quant):
    plain = LLM(default_gguf_path, quant=quant, max_model_len=256, weight_cache=False)
    assert not cache_root.exists()
    first = LLM(default_gguf_path, quant=quant, max_model_len=256, weight_cache=True)
    files = list(cache_root.glob("*.safetensors"))
    assert len(files) == 1 and quant in files[0].name and not list(cache_root.glob("*.tmp"))
    again = LLM(default_gguf_path, quant=quant, max_model_len=256, weight_cache=True)
    ref_ids, ref_logits = _logits(plain)
    for llm in (first, again):
        ids, logits = _logits(llm)
        assert ids == ref_ids and torch.equal(logits, ref_logits)
    mapped = again.model.converted_tensors()
    for name, t in first.model.converted_tensors().items():
        assert torch.equal(mapped[name], t), name


def test_key_changes_with_source_and_options(default_gguf_path, cache_root, tmp_path):
    a = wc.cache_file(default_gguf_path, torch.float32, "none", 0, 1)
    assert a != wc.cache_file(default_gguf_path, torch.bfloat16, "none", 0, 1)
    assert a != wc.cache_file(default_gguf_path, torch.float32, "w8a16", 0, 1)
    assert a != wc.cache_file(default_gguf_path, torch.float32, "none", 1, 2)
    copy = tmp_path / default_gguf_path.name
    copy.write_bytes(default_gguf_path.read_bytes())
    b = wc.cache_file(copy, torch.float32, "none", 0, 1)
    os.utime(copy, ns=(1, 1))  # same bytes, other mtime: another key
    assert b != wc.cache_file(copy, torch.float32, "none", 0, 1)


def test_torn_or_misfit_file_is_converted_again(default_gguf_path, cache_root):
    path = wc.cache_file(default_gguf_path, torch.float32, "w8a16", 0, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    llm = LLM(default_gguf_path, quant="w8a16", max_model_len=256, weight_cache=True)
    assert wc.load(path) is not None  # replaced by a good file
    good = _logits(llm)
    tensors = dict(wc.load(path))
    tensors["layers.3.qkv.w_q"] = tensors["layers.3.qkv.w_q"][:-1]  # wrong shape
    assert wc.save(path, tensors)
    with pytest.raises(ValueError, match=r"layers.3.qkv: shape"):
        from ringfuse.runtime.model import LlamaModel

        LlamaModel(llm.weights, quant="w8a16", converted=wc.load(path))
    again = LLM(default_gguf_path, quant="w8a16", max_model_len=256, weight_cache=True)
    assert _logits(again)[0] == good[0] and torch.equal(_logits(again)[1], good[1])
    assert wc.load(path)["layers.3.qkv.w_q"].shape == llm.model.layers[3].qkv.w_q.shape  # rewritten


def test_unwritable_cache_still_loads(default_gguf_path, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("RINGFUSE_CACHE", str(blocked))
    llm = LLM(default_gguf_path, quant="w8a16", max_model_len=256, weight_cache=True)
    assert llm.generate([PROMPT], max_new_tokens=2, ignore_eos=True)[0].token_ids


def test_saving_removes_superseded_files(cache_root, tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x")
    old = wc.cache_file(src, torch.float32, "none", 0, 1)
    assert wc.save(old, {"a": torch.ones(2)})
    other = wc.cache_file(src, torch.float32, "w8a16", 0, 1)  # other options: kept
    assert wc.save(other, {"a": torch.ones(2)})
    os.utime(src, ns=(5, 5))  # the source changed
    new = wc.cache_file(src, torch.float32, "none", 0, 1)
    assert new != old and wc.save(new, {"a": torch.zeros(2)})
    assert not old.exists() and other.exists() and torch.equal(wc.load(new)["a"], torch.zeros(2))
