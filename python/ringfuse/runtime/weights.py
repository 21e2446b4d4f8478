"""Weight sources: an HF model folder (config.json + *.safetensors, sharded or not, read
through safetensors' mmap) or a GGUF file (the ``gguf`` package reads and dequantizes).

Both answer ``get(name, dim, start, stop)`` in HF tensor names
(``model.layers.3.self_attn.q_proj.weight``...), returning only the requested rows or
columns: under tensor parallelism each rank reads its own slices. GGUF rows of a
quantized tensor are whole blocks, so row slices are cut before dequantizing; column
slices too when they fall on block boundaries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig

_GGUF_NAMES = {  # GGUF tensor name -> HF name ({i}: layer index)
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "model.layers.{i}.input_layernorm",
    "attn_q": "model.layers.{i}.self_attn.q_proj",
    "attn_k": "model.layers.{i}.self_attn.k_proj",
    "attn_v": "model.layers.{i}.self_attn.v_proj",
    "attn_output": "model.layers.{i}.self_attn.o_proj",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "ffn_up": "model.layers.{i}.mlp.up_proj",
    "ffn_down": "model.layers.{i}.mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in _GGUF_NAMES:
        return None
    return _GGUF_NAMES[m.group(2)].format(i=m.group(1)) + "." + m.group(3)


class GGUFWeights:
    """A GGUF file. Dequantized tensors come back as fp32 (F16/BF16 ones in their dtype)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on bad bytes
            raise ValueError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.metadata = {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}
        self.tensors = {}
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is not None:
                self.tensors[name] = t
        self.config = ModelConfig.from_gguf(self.metadata, [t.name for t in self.reader.tensors], str(self.path))
        # Llama 3.1+ GGUFs carry the RoPE scaling as per-frequency divisors, not as metadata
        freqs = next((t for t in self.reader.tensors if t.name == "rope_freqs.weight"), None)
        if freqs is not None:
            factors = gguf.quants.dequantize(np.asarray(freqs.data), freqs.tensor_type).astype(np.float64).ravel()
            if factors.shape != (self.config.head_dim // 2,):
                raise ValueError(f"{self.path}: rope_freqs.weight has {factors.size} values, expected head_dim / 2 = "
                                 f"{self.config.head_dim // 2}")  # fmt: skip
            scaling = {"rope_type": "rope_freqs", "factors": tuple(factors.tolist())}
            self.config = dataclasses.replace(self.config, rope_scaling=scaling)
        # llama.cpp's converter interleaves each head's q/k rows for its GPT-J style RoPE;
        # undo it (as transformers does) so every source has HF's rotate-half layout.
        self._permuted = self.config.arch == "llama"

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

        t = self.tensors.get(name)
        if t is None:
            raise ValueError(f"{self.path}: no tensor for {name!r}")
        data = t.data  # numpy memmap: [rows, bytes per row] for quantized types
        qtype = t.tensor_type
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        plain = qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
        typed = qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)  # else rows of bytes (BF16 too)
        cols = None
        if dim == 0:
            data = data[start:stop]
        elif dim == 1:
            if plain or (start % block == 0 and (stop is None or stop % block == 0)):
                b0 = start // block * block_bytes
                b1 = None if stop is None else stop // block * block_bytes
                data = data[:, start:stop] if typed else data[:, b0:b1]
            else:
                cols = (start, stop)
        try:
            if qtype == GGMLQuantizationType.BF16:
                out = torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16)  # a copy: not the mmap
            elif plain:
                out = torch.from_numpy(np.array(data))
            else:
                out = torch.from_numpy(quants.dequantize(np.ascontiguousarray(data), qtype))
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {t.name} has quantization {qtype.name}, which the gguf "
                             "package cannot dequantize") from None  # fmt: skip
        if cols is not None:
            out = out[:, cols[0] : cols[1]]
        if self._permuted and (".q_proj." in name or ".k_proj." in name):
            out = _unpermute_rows(out, self.config.head_dim)
        return out.contiguous()


def _unpermute_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per head of head_dim rows: GGUF's interleaved (x0, x_half, x1, x_half+1...) order
    back to rotate-half order. Works on any whole-head row slice."""
    heads = w.shape[0] // head_dim
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class SafetensorsWeights:
    """An HF model folder: config.json plus model.safetensors or a sharded index."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(folder)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{self.path}: no config.json (expected an HF model folder or a .gguf file)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        self.config = ModelConfig.from_hf(cfg, str(cfg_path))
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors files (ringfuse reads safetensors, not .bin)")
        self.handles, self.where = [], {}
        for f in files:
            try:
                h = safe_open(str(self.path / f), framework="pt")
            except Exception as e:
                raise ValueError(f"{self.path / f}: not a readable safetensors file ({e})") from None
            self.handles.append(h)
            self.where.update({k: h for k in h.keys()})

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        h = self.where.get(name)
        if h is None:
            raise ValueError(f"{self.path}: no tensor {name!r} in the safetensors files")
        if dim is None:
            return h.get_tensor(name)
        sl = h.get_slice(name)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]


def open_weights(path: str | os.PathLike):
    """A weight source for a .gguf file or an HF model folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model {str(path)!r} not found: give an HF model folder (config.json + "
                                "*.safetensors) or a .gguf file")  # fmt: skip
    if p.is_dir():
        return SafetensorsWeights(p)
    return GGUFWeights(p)
