"""Inference layers shared by the runtime's models: linear (float / w8a16 / w8a8), the gated
MLP, attention over the paged KV cache, the vocab embedding and LM head, and ``sharding``,
the one place where tensor-parallel splits (heads, KV heads, vocab, columns) are decided.
Each layer module also says which named tensors (and which slices of them, ``Shard``s)
its weights are: ``qkv_shards``, ``o_proj_shards``, ``gate_up_shards``, ``down_shards``,
``vocab_shards``; ``Linear.load`` reads them.
(The RMSNorm layer is ``ops.PreparedRMSNorm``: its weights are checked once at load.)"""

from .attention import KVCache, Step, StepAttention, o_proj_shards, qkv_shards
from .embedding import LMHead, VocabEmbedding, vocab_shards
from .linear import QUANT_MODES, Linear, has_bias, read_bias
from .mlp import GatedMLP, down_shards, gate_up_shards
from .sharding import Shard, attention_head_split, even_range, head_split, vocab_range

__all__ = ["QUANT_MODES", "GatedMLP", "KVCache", "LMHead", "Linear", "Shard", "Step", "StepAttention",
           "VocabEmbedding", "attention_head_split", "down_shards", "even_range", "gate_up_shards", "has_bias",
           "head_split", "o_proj_shards", "qkv_shards", "read_bias", "vocab_range", "vocab_shards"]
