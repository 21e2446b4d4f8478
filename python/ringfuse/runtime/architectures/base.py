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

    @classmethod
    def hf_fields(cls, cfg: dict, source: str) -> dict:
        """ModelConfig fields this family reads from config.json beyond the common ones."""
        return {}

    @classmethod
    def gguf_fields(cls, meta: dict, names: set[str], source: str) -> dict:
        """ModelConfig fields this family reads from GGUF metadata / tensor names."""
        return {}

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
