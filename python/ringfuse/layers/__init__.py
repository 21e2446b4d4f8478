"""Inference layers shared by the runtime's models: linear (float / w8a16 / w8a8), the gated
MLP, attention over the paged KV cache, and ``sharding``, the one place where
tensor-parallel splits (heads, KV heads, vocab, columns) are decided."""

from .attention import KVCache, Step, StepAttention
from .linear import QUANT_MODES, Linear
from .mlp import GatedMLP
from .sharding import attention_head_split, even_range, head_split, vocab_range

__all__ = ["QUANT_MODES", "GatedMLP", "KVCache", "Linear", "Step", "StepAttention", "attention_head_split",
           "even_range", "head_split", "vocab_range"]
