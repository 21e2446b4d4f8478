"""The inference runtime: decoder models of the registered architectures (``architectures``:
Llama, Mistral, Qwen2, Qwen3, Gemma 2) from HF folders and GGUF files, a paged KV cache,
sampling, and the generation engine (``LLM``)."""

from .engine import LLM, GenerationResult, TokenEvent
from .sampling import SamplingParams

__all__ = ["LLM", "GenerationResult", "SamplingParams", "TokenEvent"]
