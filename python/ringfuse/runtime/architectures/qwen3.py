"""Qwen3 (``Qwen3ForCausalLM``): Llama's block with an RMSNorm over each q and k head
(weights [head_dim], shared by the heads) before RoPE, and an explicit head_dim.

The per-head norms run ringfuse's rms_norm in place on the fused q/k/v output: one call for
all q heads and one for all k heads when a token's heads are the whole rows (T = 1), else
one per head (each head's rows are evenly strided), so a decode step stays capturable.
"""

from __future__ import annotations

from .base import register
from .llama import Llama, LlamaBlock, qwen_layer_windows


def norm_heads_(x, heads: int, head_dim: int, norm) -> None:
    """RMSNorm over each head of x [T, heads * head_dim] (rows may be strided), in place."""
    rows = x.shape[0]
    if rows == 1:
        v = x.view(heads, head_dim)
        norm(v, out=v)
        return
    for j in range(heads):
        v = x[:, j * head_dim : (j + 1) * head_dim]  # [T, D], row stride = the qkv width
        norm(v, out=v)


class Qwen3Block(LlamaBlock):
    def __init__(self, load):
        super().__init__(load)
        self.q_norm = load.norm("q_norm", "self_attn.q_norm", size=load.head_dim)
        self.k_norm = load.norm("k_norm", "self_attn.k_norm", size=load.head_dim)
        self.hq, self.hkv, self.d = load.hq, load.hkv, load.head_dim

    def attend(self, x, attention, layer: int):
        qkv = self.qkv(x)  # [T, (Hq + 2 Hkv) D]
        q_end, k_end = self.hq * self.d, (self.hq + self.hkv) * self.d
        norm_heads_(qkv[:, :q_end], self.hq, self.d, self.q_norm)
        norm_heads_(qkv[:, q_end:k_end], self.hkv, self.d, self.k_norm)
        return attention(qkv, layer)


@register
class Qwen3(Llama):
    name = "qwen3"
    hf_classes = ("Qwen3ForCausalLM",)
    gguf_name = "qwen3"
    gguf_permuted_qk = False
    gguf_layer_tensors = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    block = Qwen3Block  # attention_bias covers q/k/v and o, as in Llama

    @classmethod
    def hf_layer_windows(cls, cfg, num_layers, source):
        return qwen_layer_windows(cfg, num_layers, source)

    @classmethod
    def layer_shapes(cls, cfg):
        return {"self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,)}
