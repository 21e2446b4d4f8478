"""The inference runtime: Llama-family models from HF folders and GGUF files, a paged KV
cache, sampling, and the generation engine (``LLM``)."""

from .engine import LLM, GenerationResult, TokenEvent
from .sampling import SamplingParams

__all__ = ["LLM", "GenerationResult", "SamplingParams", "TokenEvent"]
