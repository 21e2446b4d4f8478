"""``ringfuse bench generate --shape`` (the random-weight model bench that a GPU runs with
``--device cuda``): on the CPU with the tiny shape, every engine runs, the JSON has their
figures, and ringfuse fp32 starts with HF fp32's greedy tokens on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from ringfuse import cli  # noqa: E402
from ringfuse.bench import random_generate  # noqa: E402


def test_tiny_shape_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("RINGFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gen.json"
    assert random_generate.run(device="cpu", shape="tiny", batch=2, prompt_tokens=8, new_tokens=8,
                               json_path=str(out)) == 0  # fmt: skip
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == {"hf-fp32-eager", "ringfuse-fp32", "ringfuse-fp32-w8a16", "ringfuse-fp32-w8a8"}
    assert all(r["decode_tok_s"] > 0 and r["batch_tok_s"] > 0 and len(r["tokens"]) == 8 for r in results.values())
    assert results["ringfuse-fp32"]["tokens"][:4] == results["hf-fp32-eager"]["tokens"][:4]
    # int8 reads a quarter of fp32's weight bytes
    assert results["ringfuse-fp32-w8a16"]["weight_bytes"] < results["ringfuse-fp32"]["weight_bytes"] / 3
    assert (tmp_path / "cache" / "bench" / "random-tiny" / "tokenizer.json").is_file()


def test_bad_shape_and_missing_gpu(capsys):
    assert cli.main(["bench", "generate", "--shape", "llama-9000"]) == 2
    assert "--shape must be one of" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert cli.main(["bench", "generate", "--device", "cuda"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().out
