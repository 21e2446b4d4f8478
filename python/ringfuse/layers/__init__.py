"""Inference layers shared by the runtime's models: linear (float / w8a16 / w8a8), the gated
MLP, attention over the paged KV cache, the vocab embedding and LM head, and ``sharding``,
the one place where tensor-parallel splits (heads, KV heads, vocab, columns) are decided.
(The RMSNorm layer is ``ops.PreparedRMSNorm``: its weights are checked once at load.)"""

from .attention import KVCache, Step, StepAttention
from .embedding import LMHead, VocabEmbedding
from .linear import QUANT_MODES, Linear
from .mlp import GatedMLP
from .sharding import attention_head_split, even_range, head_split, vocab_range

__all__ = ["QUANT_MODES", "GatedMLP", "KVCache", "LMHead", "Linear", "Step", "StepAttention", "VocabEmbedding",
           "attention_head_split", "even_range", "head_split", "vocab_range"]
