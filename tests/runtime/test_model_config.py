"""ModelConfig from hostile config.json files and GGUF headers: a clear ValueError naming the
file (and the key) for anything that is not a Llama-family config, never an AttributeError,
TypeError or RecursionError from the parsing; and which biases each architecture has."""

from __future__ import annotations

import json
import re
import struct

import pytest

from ringfuse.runtime.config import ModelConfig
from ringfuse.runtime.weights import open_weights

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0}  # fmt: skip


# ---- biases per architecture (as HF's modules build them) --------------------------------


@pytest.mark.parametrize("arch,flags,want", [
    ("LlamaForCausalLM", {}, (False, False, False)),
    ("LlamaForCausalLM", {"attention_bias": True}, (True, True, False)),  # q/k/v and o
    ("LlamaForCausalLM", {"mlp_bias": True}, (False, False, True)),  # gate/up/down
    ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}, (True, True, True)),
    ("Qwen2ForCausalLM", {}, (True, False, False)),  # q/k/v always, never o or MLP
    ("Qwen2ForCausalLM", {"attention_bias": True, "mlp_bias": True}, (True, False, False)),
    ("MistralForCausalLM", {"attention_bias": True, "mlp_bias": True}, (False, False, False)),  # HF ignores both
])  # fmt: skip
def test_bias_flags(arch, flags, want):
    cfg = ModelConfig.from_hf({**BASE, "architectures": [arch], **flags})
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == want


# ---- config.json that is not a config ------------------------------------------------------


def _folder(tmp_path, data: bytes):
    (tmp_path / "config.json").write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("value", [[1, 2], "LlamaForCausalLM", 42, None, True], ids=repr)
def test_config_not_an_object(tmp_path, value):
    path = _folder(tmp_path, json.dumps(value).encode())
    want = f"{path / 'config.json'}: expected a JSON object, got {type(value).__name__}"
    with pytest.raises(ValueError, match=re.escape(want)):
        open_weights(path)


@pytest.mark.parametrize("data", [b"{ not json", b"", b'{"a": 1} trailing', b'{"vocab_size": "\xff\xfe"}'],
                         ids=["syntax", "empty", "trailing", "not-utf8"])  # fmt: skip
def test_config_invalid_json(tmp_path, data):
    path = _folder(tmp_path, data)
    with pytest.raises(ValueError, match=re.escape(f"{path / 'config.json'}: not valid JSON")):
        open_weights(path)


@pytest.mark.parametrize("index", [b"[]", b"{oops", b'{"weight_map": ["a.safetensors"]}',
                                   b'{"weight_map": {"x": 3}}', b'{"weight_map": {"x": "../m.safetensors"}}'],
                         ids=["list", "invalid", "map-list", "map-int", "map-path"])  # fmt: skip
def test_sharded_index_not_an_index(tmp_path, index):
    _folder(tmp_path, json.dumps(BASE).encode())
    (tmp_path / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'model.safetensors.index.json'}: ")):
        open_weights(tmp_path)


@pytest.mark.parametrize("override,message", [
    ({"hidden_size": "64"}, "hidden_size must be a positive int, got '64'"),
    ({"head_dim": None, "num_attention_heads": 0}, "num_attention_heads must be a positive int, got 0"),
    ({"num_attention_heads": 4.0}, "num_attention_heads must be a positive int, got 4.0"),
    ({"vocab_size": True}, "vocab_size must be a positive int, got True"),
    ({"max_position_embeddings": [128]}, "max_position_embeddings must be a positive int, got [128]"),
    ({"sliding_window": "4096"}, "sliding_window must be a positive int, got '4096'"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number, got '1e-6'"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive finite number, got -1.0"),
    ({"rope_theta": [1e4]}, "rope_theta must be a number, got [10000.0]"),
    ({"rope_scaling": [8.0]}, "rope_scaling must be an object, got [8.0]"),
    ({"rope_parameters": "llama3"}, "rope_parameters must be an object, got 'llama3'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling original_max_position_embeddings must be a number, got None"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of strings, got 'LlamaForCausalLM'"),
    ({"architectures": [{"a": 1}]}, "architectures must be a list of strings"),
    ({"eos_token_id": "</s>"}, "token ids must be non-negative ints, got '</s>'"),
    ({"bos_token_id": [1]}, "token ids must be non-negative ints, got [1]"),
    # booleans are JSON booleans: the string "false" would be truthy (transformers refuses it too)
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"attention_bias": "no"}, "attention_bias must be true or false, got 'no'"),
    ({"mlp_bias": 0}, "mlp_bias must be true or false, got 0"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": "true"},
     "use_sliding_window must be true or false, got 'true'"),
    ({"architectures": ["Gemma2ForCausalLM"], "head_dim": 16, "tie_word_embeddings": 1},
     "tie_word_embeddings must be true or false, got 1"),
    ({"architectures": ["Gemma2ForCausalLM"], "head_dim": 16, "attention_bias": "false"},
     "attention_bias must be true or false"),
    ({"architectures": ["Gemma2ForCausalLM"], "head_dim": 16, "use_bidirectional_attention": "false"},
     "use_bidirectional_attention must be true or false"),
    # Llama 3.1 RoPE scaling values that would give NaN or meaningless frequencies
    ({"rope_scaling": {"rope_type": "llama3", "factor": 0.0, "original_max_position_embeddings": 64}},
     "rope_scaling factor must be a positive finite number, got 0.0"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": float("nan"), "original_max_position_embeddings": 64}},
     "rope_scaling factor must be a positive finite number, got nan"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": -5}},
     "rope_scaling original_max_position_embeddings must be a positive finite number, got -5"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                          "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
     "rope_scaling high_freq_factor (4) must be greater than low_freq_factor (4)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                       "low_freq_factor": 0.0}},
     "rope_scaling low_freq_factor must be a positive finite number, got 0.0"),
    ({"head_dim": 320, "hidden_size": 1280}, "head_dim must be <= 256 (the attention kernels' limit), got 320"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
     "pre-quantized checkpoints are not supported (quantization_config: quant_method 'fp8')"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
     "pre-quantized checkpoints are not supported (quantization_config: quant_method 'gptq')"),
])  # fmt: skip
def test_config_wrong_types(override, message):
    """Each names the file and the key: no TypeError / ZeroDivisionError from the arithmetic,
    no float() message without a key, no bool taken for an int."""
    with pytest.raises(ValueError, match=re.escape(f"cfg.json: {message}")):
        ModelConfig.from_hf({**BASE, **override}, "cfg.json")


# ---- GGUF metadata arrays nested without end ---------------------------------------------------


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _nested_gguf(path, depth: int):
    """A GGUF v3 file, no tensors, one metadata key: ``depth`` arrays inside each other around
    one uint32 (7). Each level is 12 bytes: a 5,000-deep nesting is 60 KB."""
    value = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string("t.nested") + value)
    return path


def test_gguf_deeply_nested_arrays(tmp_path):
    pytest.importorskip("gguf")
    from ringfuse.runtime.weights import read_gguf_header

    path = _nested_gguf(tmp_path / "deep.gguf", 5000)  # was "maximum recursion depth exceeded"
    with pytest.raises(ValueError, match=r"not a readable GGUF file \(metadata arrays nested deeper than 16 "
                                         r"levels \(corrupt or unsupported GGUF\)\)"):  # fmt: skip
        open_weights(path)
    with pytest.raises(ValueError, match="nested deeper than 16"):
        read_gguf_header(_nested_gguf(tmp_path / "17.gguf", 17))
    metadata, tensors = read_gguf_header(_nested_gguf(tmp_path / "16.gguf", 16))  # the limit itself reads
    value = metadata["t.nested"]
    for _ in range(15):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == [7] and tensors == []


@pytest.mark.parametrize("arch,flags", [
    ("LlamaForCausalLM", {"tie_word_embeddings": None, "attention_bias": None, "mlp_bias": None}),
    ("Gemma2ForCausalLM", {"head_dim": 16, "tie_word_embeddings": None, "attention_bias": None}),
])  # fmt: skip
def test_null_booleans_take_the_default(arch, flags):
    cfg = ModelConfig.from_hf({**BASE, "architectures": [arch], **flags})
    assert cfg.tie_word_embeddings == (arch == "Gemma2ForCausalLM") and not cfg.attention_bias
