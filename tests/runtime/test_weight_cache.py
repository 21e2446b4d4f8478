"""The converted-weights cache: the first load writes this rank's converted tensors, later
loads map them and give bitwise the same logits; a changed source, other options, a torn or
misfit file and weight_cache=False are handled."""

import os
import time

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


def test_same_size_edit_with_mtime_put_back_changes_the_key(cache_root, tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"a" * 64)
    before = src.stat()
    key = wc.cache_file(src, torch.float32, "none", 0, 1)
    for _ in range(300):  # ctime ticks at the file system's clock (coarse on some: up to 2 s)
        time.sleep(0.01)
        src.write_bytes(b"b" * 64)  # same size
        if src.stat().st_ctime_ns != before.st_ctime_ns:
            break
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` / `touch -r` do
    assert src.stat().st_mtime_ns == before.st_mtime_ns and src.stat().st_size == before.st_size
    assert key != wc.cache_file(src, torch.float32, "none", 0, 1)


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
        from ringfuse.runtime.model import DecoderModel

        DecoderModel(llm.weights, quant="w8a16", converted=wc.load(path))
    again = LLM(default_gguf_path, quant="w8a16", max_model_len=256, weight_cache=True)
    assert _logits(again)[0] == good[0] and torch.equal(_logits(again)[1], good[1])
    assert wc.load(path)["layers.3.qkv.w_q"].shape == llm.model.layers[3].qkv.w_q.shape  # rewritten


def test_unwritable_cache_still_loads(default_gguf_path, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("RINGFUSE_CACHE", str(blocked))
    with pytest.warns(RuntimeWarning, match=rf"RINGFUSE_CACHE={blocked}: {blocked} is a file") as seen:
        llm = LLM(default_gguf_path, quant="w8a16", max_model_len=256, weight_cache=True)
    assert len([w for w in seen if "cache" in str(w.message)]) == 1  # one warning, then uncached
    assert llm.generate([PROMPT], max_new_tokens=2, ignore_eos=True)[0].token_ids


@pytest.mark.parametrize("problem", ["file", "read-only"])
def test_default_model_with_a_bad_cache_folder_is_a_clear_error(tmp_path, monkeypatch, problem):
    """The default model (not installed) goes into $RINGFUSE_CACHE: a file there, or a folder
    it cannot write, is a ValueError naming RINGFUSE_CACHE, not an OSError traceback."""
    from ringfuse.runtime import model_files

    monkeypatch.setattr(model_files, "_installed_default", lambda: None)
    root = tmp_path / "cache"
    if problem == "file":
        root.write_text("x")
        match = rf"RINGFUSE_CACHE={root}: {root} is a file, not a folder"
    else:  # root ignores permission bits: the refusal is simulated where the download writes
        root.mkdir()

        def refuse(target, log=None):
            raise PermissionError(13, "Permission denied", str(target.parent))

        monkeypatch.setattr(model_files, "_download_default", refuse)
        match = rf"RINGFUSE_CACHE={root}: .*Permission denied"
    monkeypatch.setenv("RINGFUSE_CACHE", str(root))
    with pytest.raises(ValueError, match=match):
        LLM(max_model_len=256)


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


def test_same_named_sources_in_two_folders_keep_their_caches(cache_root, tmp_path):
    """Two different m.gguf files: saving one's cache never removes the other's; only an
    older version of the same file is superseded."""
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for src in (a, b):
        src.parent.mkdir()
        src.write_bytes(b"x")
        os.utime(src, ns=(1, 1))  # same name, size and mtime: only the folder differs
    ca, cb = (wc.cache_file(src, torch.float32, "none", 0, 1) for src in (a, b))
    assert ca != cb and wc.save(ca, {"a": torch.ones(2)}) and wc.save(cb, {"a": torch.ones(2)})
    assert ca.exists() and cb.exists()
    os.utime(a, ns=(2, 2))  # a changes: its old cache goes, b's stays
    ca2 = wc.cache_file(a, torch.float32, "none", 0, 1)
    # an older release's names had no path hash: the one with a's new digest is a's, the other unknown
    legacy, unknown = (ca2.with_name(f"m-float32-none-{d}.safetensors") for d in (ca2.name[-28:-12], "0" * 16))
    for f in (legacy, unknown):
        f.write_bytes(b"x")
    assert wc.save(ca2, {"a": torch.zeros(2)})
    assert not ca.exists() and ca2.exists() and cb.exists() and not legacy.exists() and unknown.exists()


_SLOW_WRITER = """
import sys, time, torch, safetensors.torch
from pathlib import Path
from ringfuse.runtime import weight_cache as wc

def slow_save(tensors, filename, *a, **k):  # writes part of the file, then hangs
    with open(filename, "wb") as f:
        f.write(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(600)

safetensors.torch.save_file = slow_save
wc.save(Path(sys.argv[1]), {"a": torch.ones(2)})
"""


def _start_writer(path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    return proc


def test_stale_temp_files_are_removed_on_the_next_save(cache_root, tmp_path):
    """A writer killed mid-save leaves its temp file; the next save removes it (its pid is
    dead), but never the temp file of a writer still running, nor a recent one it cannot
    check; an old one it cannot check goes."""
    import signal

    src = tmp_path / "m.gguf"
    src.write_bytes(b"x")
    path = wc.cache_file(src, torch.float32, "none", 0, 1)
    killed, live = _start_writer(path), _start_writer(wc.cache_file(src, torch.float32, "w8a16", 0, 1))
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        temps = {p.name for p in cache_root.glob("*.tmp")}
        assert len(temps) == 2 and all(".tmp" in t for t in temps)
        unknown = cache_root / (path.name + ".abc123.tmp")  # an older release's name: no pid
        unknown.write_bytes(b"x")
        old = cache_root / (path.name + ".def456.tmp")
        old.write_bytes(b"x")
        os.utime(old, (1, 1))
        other = wc.cache_file(src, torch.bfloat16, "none", 0, 1)
        assert wc.save(other, {"a": torch.ones(2)})
        left = {p.name for p in cache_root.glob("*.tmp")}
        assert left == {unknown.name} | {t for t in temps if f"-{live.pid}." in t}, left
    finally:
        live.kill()
        live.wait()
