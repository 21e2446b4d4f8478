"""`ringfuse generate` and `ringfuse chat` as a user runs them (subprocesses, default model)."""

import os
import subprocess
import sys

import pytest


def _run(args, stdin="", env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ringfuse", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def model_arg(default_gguf_path):
    return ["--model", str(default_gguf_path), "--threads", "1"]


def test_generate_streams_text_and_prints_figures(model_arg, llm_fp32):
    done = _run(["generate", *model_arg, "--max-new-tokens", "12", "What is the capital of France?"])
    assert done.returncode == 0, done.stderr
    want = llm_fp32.generate("What is the capital of France?", max_new_tokens=12)[0].text
    assert done.stdout.strip() == want.strip() and "Paris" in done.stdout
    assert "decode" in done.stderr and "tok/s" in done.stderr


def test_generate_several_prompts(model_arg):
    done = _run(["generate", *model_arg, "--max-new-tokens", "4", "--ignore-eos", "Hi", "Hello there"])
    assert done.returncode == 0, done.stderr
    assert "--- [0] Hi" in done.stdout and "--- [1] Hello there" in done.stdout
    assert "8 new tokens" in done.stderr


def test_chat_reads_lines_until_eof(model_arg):
    done = _run(["chat", *model_arg, "--max-new-tokens", "12"], stdin="What is the capital of France?\n")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


@pytest.mark.parametrize("args,match", [
    (["generate", "--quant", "int4", "x"], "invalid choice"),
    (["generate", "--max-new-tokens", "0", "x"], "--max-new-tokens must be >= 1"),
    (["generate", "--tp", "2", "x"], "torchrun --nproc-per-node 2"),
    (["generate", "--model", "/nonexistent.gguf", "x"], "not found"),
])  # fmt: skip
def test_bad_flags_are_clear_errors(args, match):
    done = _run(args)
    assert done.returncode == 2 and match in done.stderr, done.stderr
