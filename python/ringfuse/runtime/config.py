"""ModelConfig: the shape of a decoder, read from an HF config.json or from GGUF metadata.
The architecture registry (``architectures``) says which families run and reads their own
fields; any other architecture is refused here, before any weight is read."""

from __future__ import annotations

import dataclasses
import math

from ..ops.attention import MAX_HEAD_DIM
from . import architectures

_HF_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")  # fmt: skip


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v, what: str) -> float:
    """A JSON / GGUF number as float; anything else (a string, a list, a bool) is a ValueError
    naming the key, not float()'s TypeError or its message without one."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} must be a number, got {_short(v)}")
    return float(v)


def _make(cls, source: str, **kw):
    """cls(**kw), its __post_init__ errors naming the file they came from."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise ValueError(f"{source}: {str(e).removeprefix('model config: ')}") from None


def _check_hf_types(cfg: dict, source: str) -> None:
    """The values from_hf computes with, checked first: a hostile config.json gets a ValueError
    naming the file and the key, not a TypeError / ZeroDivisionError from the arithmetic."""
    for key in _HF_INTS:
        v = cfg.get(key)
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"{source}: {key} must be a positive int, got {_short(v)}")
    for key in ("rms_norm_eps", "rope_theta"):
        if cfg.get(key) is not None:
            _num(cfg[key], f"{source}: {key}")
    for key in ("rope_scaling", "rope_parameters"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{source}: {key} must be an object, got {_short(v)}")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{source}: architectures must be a list of strings, got {_short(archs)}")


def _check_llama3_scaling(scaling: dict, source: str) -> None:
    """Llama 3.1 RoPE scaling values that inv_freq() can compute with: a factor of 0 or NaN
    gives NaN logits, high <= low divides by zero (transformers only warns on these)."""
    what = f"{source}: rope_scaling"
    factor = _num(scaling.get("factor"), f"{what} factor")
    old_len = _num(scaling.get("original_max_position_embeddings"), f"{what} original_max_position_embeddings")
    low = _num(scaling.get("low_freq_factor", 1.0), f"{what} low_freq_factor")
    high = _num(scaling.get("high_freq_factor", 4.0), f"{what} high_freq_factor")
    for key, value in (("factor", factor), ("original_max_position_embeddings", old_len),
                       ("low_freq_factor", low), ("high_freq_factor", high)):  # fmt: skip
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what} {key} must be a positive finite number, got {_short(scaling.get(key))}")
    if high <= low:
        raise ValueError(f"{what} high_freq_factor ({high:g}) must be greater than low_freq_factor ({low:g})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # a key of architectures.REGISTRY: "llama", "mistral", "qwen2", "qwen3", "gemma2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # Llama with attention_bias (HF's flag covers q/k/v and o)
    mlp_bias: bool = False  # gate/up/down biases (Llama with mlp_bias)
    # Llama 3.1 "llama3" scaling (HF), or {"rope_type": "rope_freqs", "factors": (...)}: a GGUF's
    # rope_freqs tensor (llama.cpp: inv_freq / factor); None = plain RoPE
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    attn_scale: float | None = None  # None: 1/sqrt(head_dim) (Gemma 2: query_pre_attn_scalar^-1/2)
    attn_softcap: float | None = None  # attention scores capped as c * tanh(s / c) (Gemma 2)
    final_softcap: float | None = None  # logits capped alike (Gemma 2)
    # each layer's sliding window (0: the whole context), or () when no layer has one:
    # query i sees keys (i - window, i] (Mistral: all layers; Gemma 2: the even ones)
    layer_windows: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive int, got {value!r}")
        if self.arch not in architectures.REGISTRY:
            raise ValueError(f"model config: unknown architecture {self.arch!r}")
        for name in ("rms_norm_eps", "rope_theta", "attn_scale", "attn_softcap", "final_softcap"):
            value = getattr(self, name)  # NaN / inf / <= 0 would give NaN logits, not an error
            if value is None and name not in ("rms_norm_eps", "rope_theta"):
                continue
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive finite number, got {value!r}")
        for value in (self.bos_token_id, *self.eos_token_ids):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"model config: token ids must be non-negative ints, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")  # fmt: skip
        w = self.layer_windows
        if not isinstance(w, tuple) or (w and len(w) != self.num_layers) or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in w):  # fmt: skip
            raise ValueError(f"model config: layer_windows must be () or {self.num_layers} ints >= 0 (0: no window), "
                             f"got {str(w)[:80]}")  # fmt: skip
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"model config: head_dim must be <= {MAX_HEAD_DIM} (the attention kernels' limit), "
                             f"got {self.head_dim}")  # fmt: skip

    @property
    def architecture(self) -> type[architectures.Architecture]:
        return architectures.REGISTRY[self.arch]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def inv_freq(self):
        """RoPE inverse frequencies [head_dim / 2] in fp64, with Llama 3.1 scaling when set
        (transformers' _compute_llama3_parameters)."""
        import torch

        d = self.head_dim
        inv = self.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        s = self.rope_scaling
        if not s:
            return inv
        if s.get("rope_type") == "rope_freqs":
            return inv / torch.tensor(s["factors"], dtype=torch.float64)
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, scaled)

    # ------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(cfg).__name__} {_short(cfg)}")
        _check_hf_types(cfg, source)
        quant = cfg.get("quantization_config")
        if quant is not None:  # its weights are not plain floats: loading them raw gives garbage
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
            raise ValueError(f"{source}: pre-quantized checkpoints are not supported (quantization_config: "
                             f"quant_method {_short(method)}); load the unquantized model, and ringfuse quantizes "
                             "it itself with quant='w8a16' or 'w8a8'")  # fmt: skip
        archs = cfg.get("architectures") or []
        arch = architectures.for_hf(archs, cfg.get("model_type"))
        if arch is None:
            raise ValueError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; ringfuse runs "
                             f"{', '.join(architectures.hf_names())}")  # fmt: skip
        try:
            heads = cfg["num_attention_heads"]
            hidden = cfg["hidden_size"]
            scaling = cfg.get("rope_scaling") or None
            rope_theta = cfg.get("rope_theta")
            params = cfg.get("rope_parameters") or {}  # transformers 5.x keeps theta/scaling here
            if rope_theta is None:
                rope_theta = params.get("rope_theta", 10000.0)
            if scaling is None and params.get("rope_type", "default") != "default":
                scaling = params
            if scaling is not None:
                kind = scaling.get("rope_type", scaling.get("type"))
                if kind not in ("llama3", "default"):
                    raise ValueError(f"{source}: unsupported rope_scaling type {kind!r} (supported: llama3)")
                scaling = None if kind == "default" else dict(scaling)
                if scaling is not None:
                    _check_llama3_scaling(scaling, source)
            if arch.hf_activation is not None:  # the block's activation is fixed: refuse another
                key, supported = arch.hf_activation
                act = cfg.get(key, supported[0])
                if act not in supported:
                    raise ValueError(f"{source}: unsupported {key} {act!r} (supported: {', '.join(supported)})")
            eos = cfg.get("eos_token_id")
            fields = dict(
                arch=arch.name,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                rms_norm_eps=_num(cfg.get("rms_norm_eps", 1e-6), f"{source}: rms_norm_eps"),
                rope_theta=_num(rope_theta, f"{source}: rope_theta"),
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                layer_windows=arch.hf_layer_windows(cfg, cfg["num_hidden_layers"], source),
                tie_word_embeddings=architectures.flag(cfg, "tie_word_embeddings", False, source),
                rope_scaling=scaling,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            )
            # the family's own fields: biases as its HF modules have them, scaling, soft caps
            return _make(cls, source, **{**fields, **arch.hf_fields(cfg, source)})
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names, source: str = "GGUF") -> "ModelConfig":
        arch = meta.get("general.architecture")
        family = architectures.for_gguf(arch)
        if family is None:
            raise ValueError(f"{source}: unsupported architecture {arch!r}; ringfuse runs GGUF architectures "
                             f"{', '.join(architectures.gguf_names())}")  # fmt: skip

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"{source}: missing metadata key {f'{arch}.{key}'!r}")
            return value

        names = set(tensor_names)
        hidden, heads = get("embedding_length"), get("attention.head_count")
        for key, v in (("embedding_length", hidden), ("attention.head_count", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:  # divided below, before __post_init__
                raise ValueError(f"{source}: {arch}.{key} must be a positive int, got {_short(v)}")
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else 0)
        scale_type = meta.get(f"{arch}.rope.scaling.type")
        if scale_type not in (None, "none"):
            raise ValueError(f"{source}: unsupported rope scaling {scale_type!r}")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        fields = dict(
            arch=family.name,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=meta.get(f"{arch}.attention.head_count_kv") or heads,
            head_dim=(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                      or hidden // heads),  # fmt: skip
            rms_norm_eps=_num(get("attention.layer_norm_rms_epsilon"), f"{source}: {arch}.layer_norm_rms_epsilon"),
            rope_theta=_num(meta.get(f"{arch}.rope.freq_base", 10000.0), f"{source}: {arch}.rope.freq_base"),
            max_position_embeddings=get("context_length"),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
        )
        layers = fields["num_layers"]
        if _is_int(layers) and layers >= 1:  # else __post_init__ names it
            fields["layer_windows"] = family.gguf_layer_windows(meta, layers, source)
        return _make(cls, source, **{**fields, **family.gguf_fields(meta, names, source)})
