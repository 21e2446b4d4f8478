"""ModelConfig: the shape of a Llama-family decoder, read from an HF config.json or from
GGUF metadata. Architectures outside the family are refused here, before any weight is read."""

from __future__ import annotations

import dataclasses
import math

# HF "architectures" / model_type and GGUF general.architecture values this runtime runs.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = ("llama", "qwen2")  # Mistral GGUFs use "llama"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "mistral" | "qwen2"
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
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    # Llama 3.1 "llama3" scaling (HF), or {"rope_type": "rope_freqs", "factors": (...)}: a GGUF's
    # rope_freqs tensor (llama.cpp: inv_freq / factor); None = plain RoPE
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")  # fmt: skip
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")

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
        archs = cfg.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if not archs and cfg.get("model_type") in HF_ARCHITECTURES.values():
            arch = cfg["model_type"]  # no "architectures" list: transformers goes by model_type too
        if arch is None:
            raise ValueError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; ringfuse runs "
                             f"{', '.join(HF_ARCHITECTURES)}")  # fmt: skip
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
            eos = cfg.get("eos_token_id")
            return cls(
                arch=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                # no sliding-window attention here: the context stops at the window (Mistral)
                max_position_embeddings=min(cfg.get("max_position_embeddings", 2048),
                                            cfg.get("sliding_window") or 1 << 62),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                rope_scaling=scaling,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names, source: str = "GGUF") -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"{source}: unsupported architecture {arch!r}; ringfuse runs GGUF architectures "
                             f"{', '.join(GGUF_ARCHITECTURES)}")  # fmt: skip

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"{source}: missing metadata key {f'{arch}.{key}'!r}")
            return value

        hidden, heads = get("embedding_length"), get("attention.head_count")
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
        scale_type = meta.get(f"{arch}.rope.scaling.type")
        if scale_type not in (None, "none"):
            raise ValueError(f"{source}: unsupported rope scaling {scale_type!r}")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=meta.get(f"{arch}.attention.head_count_kv") or heads,
            head_dim=meta.get(f"{arch}.rope.dimension_count") or hidden // heads,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=get("context_length"),
            tie_word_embeddings="output.weight" not in set(tensor_names),
            attention_bias="blk.0.attn_q.bias" in set(tensor_names),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
        )
