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
    assert data["targets"] == []  # the tiny shape has no targets


def test_bad_shape_and_missing_gpu(capsys):
    assert cli.main(["bench", "generate", "--shape", "llama-9000"]) == 2
    assert "--shape must be one of" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert cli.main(["bench", "generate", "--device", "cuda"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().out


def test_target_verdicts():
    """The GPU targets judged from a run's figures: met, short, and not measured when an
    engine failed; shapes without targets have none."""
    runs = {"hf-bf16-eager": {"decode_tok_s": 20.0}, "ringfuse-bf16": {"decode_tok_s": 150.0, "weight_bytes": 16e9},
            "ringfuse-bf16-w8a16": {"decode_tok_s": 250.0}}  # fmt: skip
    # 150 tok/s x 16 GB = 2400 GB/s of a 3000 GB/s copy: 80 %; w8a16 1.67x bf16
    got = random_generate.target_verdicts("llama3-8b", "bf16", runs, 3000.0)
    assert [(round(v, 2), met) for _, v, _, met in got] == [(80.0, True), (1.67, True)]
    assert [met for *_, met in random_generate.target_verdicts("llama3-8b", "bf16", runs, 4000.0)] == [False, True]
    small = random_generate.target_verdicts("smollm2-135m", "bf16", runs, 3000.0)
    assert [(v, met) for _, v, _, met in small] == [(7.5, False), (150.0, False)]
    failed = {**runs, "ringfuse-bf16-w8a16": "failed: out of memory"}
    assert random_generate.target_verdicts("llama3-8b", "bf16", failed, 3000.0)[1][1:] == (None, 1.6, False)
    assert random_generate.target_verdicts("tiny", "bf16", runs, 3000.0) == []
