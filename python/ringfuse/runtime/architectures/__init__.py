"""Model architectures, one file each, behind the registry in ``base``: config loading asks
it which class answers to a config.json's "architectures" or a GGUF's
general.architecture. Adding an architecture is a file here (and its HF-matched test)."""

from . import gemma2, llama, qwen3  # noqa: F401  (each registers its classes)
from .base import REGISTRY, Architecture, flag, for_gguf, for_hf, gguf_names, hf_names, register

__all__ = ["REGISTRY", "Architecture", "flag", "for_gguf", "for_hf", "gguf_names", "hf_names", "register"]
