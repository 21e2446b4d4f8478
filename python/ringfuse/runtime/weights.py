"""Weight sources: an HF model folder (config.json + *.safetensors, sharded or not, read
through safetensors' mmap) or a GGUF file (the ``gguf`` package reads and dequantizes).

Both answer ``get(name, dim, start, stop)`` in HF tensor names
(``model.layers.3.self_attn.q_proj.weight``...), returning only the requested rows or
columns: under tensor parallelism each rank reads its own slices. GGUF rows of a
quantized tensor are whole blocks, so row slices are cut before dequantizing; column
slices too when they fall on block boundaries. Both check every tensor the model reads
against the config when opened (``check_shapes``), from the file headers alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig

_GGUF_NAMES = {  # GGUF tensor name -> HF name ({i}: layer index), Llama's set
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


def _hf_name(gguf_name: str, arch) -> str | None:
    """The HF name of a GGUF tensor of architecture ``arch`` (its own layer tensors first)."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", gguf_name)
    if m is None:
        return None
    own = arch.gguf_layer_tensors.get(m.group(2)) if m.group(1) is not None else None
    if own is not None:
        return f"model.layers.{m.group(1)}.{own}.{m.group(3)}"
    if m.group(2) not in _GGUF_NAMES:
        return None
    return _GGUF_NAMES[m.group(2)].format(i=m.group(1)) + "." + m.group(3)


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: int  # GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF lists dims fastest first)
    offset: int  # absolute byte offset in the file
    n_bytes: int


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# Arrays of arrays are read recursively; real files nest one level at most (none in
# llama.cpp's writers), so a deeper nesting is a corrupt or hostile file, refused before
# Python's recursion limit turns it into a RecursionError.
_MAX_ARRAY_DEPTH = 16


class _NeedMore(ValueError):
    """The header runs past the bytes read so far."""


class _Header:
    """Bounds-checked little-endian reads over the bytes of a GGUF header."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _NeedMore("the header runs past the end of the file")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise _NeedMore(f"a string of {n} bytes runs past the end of the file")
        v = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return v

    def value(self, vtype: int, depth: int = 0):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise ValueError(f"metadata arrays nested deeper than {_MAX_ARRAY_DEPTH} levels (corrupt or "
                                 "unsupported GGUF)")  # fmt: skip
            sub, n = self.take("<I"), self.take("<Q")
            if sub in _NUMPY:  # numbers in one read
                dt = np.dtype(_NUMPY[sub])
                if self.pos + n * dt.itemsize > len(self.buf):
                    raise _NeedMore(f"an array of {n} values runs past the end of the file")
                v = np.frombuffer(self.buf, dt, n, self.pos).tolist()
                self.pos += n * dt.itemsize
                return v
            if n > len(self.buf):
                raise ValueError(f"an array claims {n} entries")
            return [self.value(sub, depth + 1) for _ in range(n)]
        if vtype not in _SCALAR:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.take(_SCALAR[vtype])


def read_gguf_header(path: Path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata {key: value}, tensors) of a GGUF file (v2/v3, little-endian): values as
    ``gguf.GGUFReader``'s ``field.contents()`` gives them (str, int, float, bool, lists;
    arrays of arrays stay nested, which GGUFReader flattens).

    Why not GGUFReader itself: it keeps a numpy memmap view per array entry, ~160 MB for
    SmolLM2's 49k tokens and merges, half of which Python never returns to the OS; this
    reads the header's bytes once (a few MB) and nothing else."""
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or struct.unpack_from("<I", head)[0] != GGUF_MAGIC:
            raise ValueError("no GGUF magic at the start")
        version = struct.unpack_from("<I", head, 4)[0]
        if version not in (2, 3):
            big = version & 0xFFFF == 0
            raise ValueError("big-endian GGUF files are not supported" if big else f"GGUF version {version} (2 or 3 supported)")
        n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
        if n_tensors > size or n_kv > size:
            raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
        # the header is the start of the file; grow the read until it fits
        chunk = 1 << 22
        while True:
            f.seek(0)
            buf = f.read(chunk)
            try:
                h = _Header(buf)
                h.pos = 24
                metadata = {}
                for _ in range(n_kv):
                    key = h.string()
                    metadata[key] = h.value(h.take("<I"))
                infos = []
                for _ in range(n_tensors):
                    name = h.string()
                    dims = [h.take("<Q") for _ in range(h.take("<I"))]
                    infos.append((name, dims, h.take("<I"), h.take("<Q")))
                break
            except _NeedMore:
                if len(buf) < chunk:  # the whole file was read: truly cut short
                    raise
                chunk *= 4
    align = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if isinstance(align, bool) or not isinstance(align, int) or align < 8 or align % 8:  # as the GGUF spec says
        raise ValueError(f"general.alignment must be a positive multiple of 8, got {align!r}")
    data_start = -(-h.pos // align) * align
    tensors = []
    for name, dims, qtype, offset in infos:
        if qtype not in GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name} has unknown type {qtype}")
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        if not dims or dims[0] % block or 0 in dims:
            raise ValueError(f"tensor {name}: shape {dims} is empty or does not fit blocks of {block}")
        t = GGUFTensor(name, qtype, tuple(reversed(dims)), data_start + offset, n // block * block_bytes)
        if t.offset + t.n_bytes > size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
        tensors.append(t)
    return metadata, tensors


class GGUFWeights:
    """A GGUF file. Dequantized tensors come back as fp32 (F16/BF16 ones in their dtype)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.metadata, tensors = read_gguf_header(self.path)
        except (ValueError, UnicodeDecodeError, struct.error) as e:
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.metadata = {k: v for k, v in self.metadata.items() if not k.startswith("GGUF.")}
        self.config = ModelConfig.from_gguf(self.metadata, [t.name for t in tensors], str(self.path))
        arch = self.config.architecture
        self.tensors = {}
        for t in tensors:
            name = _hf_name(t.name, arch)
            if name is not None:
                self.tensors[name] = t
        # Llama 3.1+ GGUFs carry the RoPE scaling as per-frequency divisors, not as metadata
        freqs = next((t for t in tensors if t.name == "rope_freqs.weight"), None)
        if freqs is not None:
            factors = self._tensor(freqs, self._read(freqs)).double().numpy().ravel()
            if factors.shape != (self.config.head_dim // 2,):
                raise ValueError(f"{self.path}: rope_freqs.weight has {factors.size} values, expected head_dim / 2 = "
                                 f"{self.config.head_dim // 2}")  # fmt: skip
            if not (np.isfinite(factors).all() and (factors > 0).all()):  # a frequency / factor: NaN logits
                raise ValueError(f"{self.path}: rope_freqs.weight must hold positive finite factors, got "
                                 f"{factors[~(np.isfinite(factors) & (factors > 0))][:4].tolist()}")  # fmt: skip
            scaling = {"rope_type": "rope_freqs", "factors": tuple(factors.tolist())}
            self.config = dataclasses.replace(self.config, rope_scaling=scaling)
        # llama.cpp's converter interleaves each head's q/k rows for its GPT-J style RoPE
        # ("llama" arch), and adds 1 to Gemma's norm weights; undo both (as transformers
        # does) so every source has HF's layout.
        self._permuted = arch.gguf_permuted_qk
        self._norm_offset = arch.norm_offset
        check_shapes(self)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        from gguf import GGML_QUANT_SIZES

        t = self.tensors.get(name)
        if t is None:
            raise ValueError(f"{self.path}: no tensor for {name!r}")
        permuted = self._permuted and (".q_proj." in name or ".k_proj." in name)
        if len(t.shape) == 1:  # norms, biases: whole, then sliced
            out = self._tensor(t, self._read(t)).reshape(-1)
            if permuted:  # llama.cpp's converter interleaves q/k biases as it does their rows
                out = _unpermute_rows(out, self.config.head_dim)
            if self._norm_offset and name.endswith("norm.weight"):
                out = out.float() - self._norm_offset  # exact while 1 + w is in [0.5, 2] (Sterbenz)
            return out[start:stop].contiguous() if dim == 0 else out
        block, block_bytes = GGML_QUANT_SIZES[t.qtype]
        data = self._read(t, start, stop) if dim == 0 else self._read(t)  # [rows, bytes per row]
        cols = None
        if dim == 1:  # cut the bytes of whole blocks before dequantizing, when the slice allows
            b0, b1 = start // block * block_bytes, None if stop is None else stop // block * block_bytes
            if start % block == 0 and (stop is None or stop % block == 0):
                data = data[:, b0:b1]
            else:
                cols = (start, stop)
        out = self._tensor(t, data)
        if dim != 1:
            out = out.reshape(out.shape[0], *t.shape[1:])
        if cols is not None:
            out = out[:, cols[0] : cols[1]]
        if permuted:
            out = _unpermute_rows(out, self.config.head_dim)
        return out.contiguous()

    def _tensor(self, t: GGUFTensor, data: np.ndarray) -> torch.Tensor:
        """Raw rows [rows, bytes] -> [rows, values]: fp32 if quantized, F32 / F16 / BF16 as stored."""
        from gguf import GGMLQuantizationType as Q
        from gguf import quants

        data = np.ascontiguousarray(data)
        if t.qtype == Q.BF16:
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        if t.qtype in (Q.F32, Q.F16):
            return torch.from_numpy(data.view(np.float32 if t.qtype == Q.F32 else np.float16))
        try:
            return torch.from_numpy(quants.dequantize(data, t.qtype))
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {t.name} has quantization {Q(t.qtype).name}, which the gguf "
                             "package cannot dequantize") from None  # fmt: skip

    def _read(self, t: GGUFTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of tensor t as raw bytes [rows, bytes per row], read into fresh
        memory (an mmap's touched pages would stay resident for as long as it lives)."""
        rows = t.shape[0] if len(t.shape) > 1 else 1
        row_bytes = t.n_bytes // rows
        start, stop, _ = slice(start, stop).indices(rows)
        out = np.empty((max(stop - start, 0), row_bytes), dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset + start * row_bytes)
            got = f.readinto(memoryview(out).cast("B"))
        if got != out.nbytes:
            raise ValueError(f"{self.path}: tensor {t.name} is cut short ({got} of {out.nbytes} bytes): truncated file?")
        return out


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
        self.config = ModelConfig.from_hf(_read_json(cfg_path), str(cfg_path))
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) and Path(f).name == f and f
                                                           for f in weight_map.values()):  # fmt: skip
                raise ValueError(f"{index}: expected a JSON object whose \"weight_map\" maps tensor names to file "
                                 "names in the folder")  # fmt: skip
            files = sorted(set(weight_map.values()))
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
        check_shapes(self)
        for name in expected_shapes(self.config):  # fp8 / int8 values read as numbers would be garbage
            dtype = self.where[name].get_slice(name).get_dtype() if name in self.where else "F32"
            if dtype not in ("F64", "F32", "F16", "BF16"):
                raise ValueError(f"{self.path}: tensor {name!r} is {dtype}; ringfuse reads float checkpoints "
                                 "(F64, F32, F16, BF16), not pre-quantized ones")  # fmt: skip

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        h = self.where.get(name)
        if h is None:
            raise ValueError(f"{self.path}: no tensor {name!r} in the safetensors files")
        if dim is None:
            return h.get_tensor(name)
        sl = h.get_slice(name)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]


def _read_json(path: Path):
    """A JSON file's value; invalid JSON or UTF-8 is a ValueError naming the file."""
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """HF name -> (shape, required) of every tensor the model reads for this config. Biases
    are optional: a missing one is zeros, as HF initializes a bias absent from the file."""
    V, H, F, q, kv = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    out = {"model.embed_tokens.weight": ((V, H), True), "model.norm.weight": ((H,), True)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ((V, H), True)
    weights = {"input_layernorm": (H,), "post_attention_layernorm": (H,), "self_attn.q_proj": (q, H),
               "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H), "self_attn.o_proj": (H, q),
               "mlp.gate_proj": (F, H), "mlp.up_proj": (F, H), "mlp.down_proj": (H, F)}  # fmt: skip
    biases = {}
    if cfg.attention_bias:
        biases.update({"self_attn.q_proj": (q,), "self_attn.k_proj": (kv,), "self_attn.v_proj": (kv,)})
    if cfg.o_proj_bias:
        biases["self_attn.o_proj"] = (H,)
    if cfg.mlp_bias:
        biases.update({"mlp.gate_proj": (F,), "mlp.up_proj": (F,), "mlp.down_proj": (H,)})
    weights = {f"{k}.weight": v for k, v in weights.items()} | cfg.architecture.layer_shapes(cfg)
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{k}": (v, True) for k, v in weights.items()})
        out.update({f"model.layers.{i}.{k}.bias": (v, False) for k, v in biases.items()})
    return out


def check_shapes(weights) -> None:
    """Every tensor the model will read, against the config, from the file headers alone:
    a misfit file (an embedding short of the vocab, a transposed projection) is a ValueError
    naming the tensor at load, not an IndexError or a wrong answer later."""
    for name, (shape, required) in expected_shapes(weights.config).items():
        if not weights.has(name):
            if required:
                raise ValueError(f"{weights.path}: missing tensor {name!r} (expected shape {list(shape)})")
            continue
        found = tuple(weights.shape(name))
        if found != shape:
            raise ValueError(f"{weights.path}: tensor {name!r} has shape {list(found)}, expected {list(shape)} "
                             "from the model config")  # fmt: skip


def release_freed_memory() -> None:
    """Hand the free pages inside the C heap back to the OS (glibc's malloc_trim; a no-op
    elsewhere). Loading frees many dequantized temporaries of a few MB, which glibc serves
    from the heap once its mmap threshold has grown; the live weights between them kept
    70-170 MB of freed pages resident (varying run to run) without this."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def open_weights(path: str | os.PathLike):
    """A weight source for a .gguf file or an HF model folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model {str(path)!r} not found: give an HF model folder (config.json + "
                                "*.safetensors) or a .gguf file")  # fmt: skip
    if p.is_dir():
        return SafetensorsWeights(p)
    return GGUFWeights(p)
