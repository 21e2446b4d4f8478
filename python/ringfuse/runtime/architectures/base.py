"""The registry of model architectures and what one of them declares.

An architecture is a subclass of ``Architecture`` in its own file: the HF class names and
the GGUF name it answers to, the config fields its family adds (biases, scaling,
soft-capping), the tensors beyond the common Llama set (with their GGUF names), and its
decoder block (weights + forward). Config loading asks the registry, so a model whose
architecture is not registered is refused before any weight is read.
"""

from __future__ import annotations

import math

REGISTRY: dict[str, type[Architecture]] = {}  # ModelConfig.arch -> class


def register(cls: type[Architecture]) -> type[Architecture]:
    REGISTRY[cls.name] = cls
    return cls


def for_hf(architectures: list[str], model_type) -> type[Architecture] | None:
    """The class of a config.json's "architectures" (or, without that list, its model_type)."""
    for a in architectures:
        for cls in REGISTRY.values():
            if a in cls.hf_classes:
                return cls
    if not architectures:
        return REGISTRY.get(model_type) if isinstance(model_type, str) else None
    return None


def for_gguf(name) -> type[Architecture] | None:
    return next((cls for cls in REGISTRY.values() if cls.gguf_name == name and cls.gguf_name is not None), None)


def hf_names() -> list[str]:
    return [a for cls in REGISTRY.values() for a in cls.hf_classes]


def gguf_names() -> list[str]:
    return sorted({cls.gguf_name for cls in REGISTRY.values() if cls.gguf_name})


def positive_number(value, what: str) -> float:
    """A config / metadata value that must be a positive finite number (soft caps, scalars)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def flag(cfg: dict, key: str, default: bool, source: str) -> bool:
    """A config.json boolean: JSON true / false, or ``default`` when absent or null. A string
    ("false" would be truthy) or a number is refused, as transformers' strict configs do."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def window_size(value, what: str) -> int:
    """A sliding window: the keys one query sees, its own included (an int >= 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def windows_from_layer_types(cfg: dict, window: int | None, num_layers: int, source: str, default) -> tuple[int, ...]:
    """HF's per-layer attention kinds (transformers 5 ``layer_types``: "sliding_attention" or
    "full_attention"), or ``default(i)`` (is layer i sliding?) without that list, as windows."""
    if window is None:
        return ()
    window = window_size(window, f"{source}: sliding_window")
    types = cfg.get("layer_types")
    if types is None:
        return tuple(window if default(i) else 0 for i in range(num_layers))
    kinds = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != num_layers or any(t not in kinds for t in types):
        raise ValueError(f"{source}: layer_types must list {num_layers} entries, each one of {kinds}, got "
                         f"{str(types)[:80]}")  # fmt: skip
    return tuple(window if t == "sliding_attention" else 0 for t in types)


class Architecture:
    """What differs between decoder families; the defaults are Llama's."""

    name: str = ""  # ModelConfig.arch
    hf_classes: tuple[str, ...] = ()  # config.json "architectures" entries
    gguf_name: str | None = None  # GGUF general.architecture
    # GGUF per-layer tensor stems that differ from / add to the common Llama map: stem -> HF
    # name under model.layers.{i}.
    gguf_layer_tensors: dict[str, str] = {}
    gguf_permuted_qk = False  # llama.cpp's converter interleaves q/k rows (its "llama" arch)
    # RMSNorm weights w scale by norm_offset + w (Gemma: 1 + w); llama.cpp's converter
    # stores norm_offset + w, which the GGUF reader takes back to HF's w
    norm_offset = 0.0

    # (config.json key, the values the block computes) checked at load, or None where
    # hf_fields checks the activation itself
    hf_activation: tuple[str, tuple[str, ...]] | None = None

    @classmethod
    def hf_fields(cls, cfg: dict, source: str) -> dict:
        """ModelConfig fields this family reads from config.json beyond the common ones."""
        return {}

    @classmethod
    def gguf_fields(cls, meta: dict, names: set[str], source: str) -> dict:
        """ModelConfig fields this family reads from GGUF metadata / tensor names."""
        return {}

    @classmethod
    def hf_layer_windows(cls, cfg: dict, num_layers: int, source: str) -> tuple[int, ...]:
        """Each layer's sliding window (0: the whole context), or () when no layer has one.
        Llama has none, whatever the config says (HF's LlamaAttention ignores the key)."""
        return ()

    @classmethod
    def gguf_layer_windows(cls, meta: dict, num_layers: int, source: str) -> tuple[int, ...]:
        """As hf_layer_windows, from ``{arch}.attention.sliding_window``: every layer by
        default (a Mistral GGUF says "llama")."""
        window = meta.get(f"{meta.get('general.architecture')}.attention.sliding_window")
        if window is None:
            return ()
        return (window_size(window, f"{source}: attention.sliding_window"),) * num_layers

    @classmethod
    def layer_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
        """Required per-layer tensors beyond the common Llama set: name under
        model.layers.{i}. -> shape."""
        return {}

    @classmethod
    def embed_scale(cls, cfg) -> float | None:
        """A factor the embedded tokens are multiplied by (Gemma: sqrt(hidden)), or None."""
        return None

    block: type  # the decoder block: block(loader) loads layer loader.index, block.forward runs it
