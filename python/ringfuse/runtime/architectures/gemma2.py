"""Gemma 2 (``Gemma2ForCausalLM``). What it adds to Llama's block:

- norms before and after each sublayer ("sandwich"): the attention and MLP outputs are
  normalized before their residual add;
- RMSNorm weights stored as w with the scale 1 + w (computed in fp32 by HF: the runtime
  folds 1 + w into the weight at load; llama.cpp's converter has already added the 1);
- embeddings scaled by sqrt(hidden) (rounded to the model dtype, as HF does);
- GeGLU (GELU, tanh approximation) instead of SwiGLU;
- attention scaled by query_pre_attn_scalar^-1/2, scores soft-capped (softcap * tanh(s /
  softcap)), and the final logits soft-capped too;
- sliding-window attention (4096 keys in the released models) on the even layers, whole
  context on the odd ones (HF's default layer_types; llama.cpp's SWA pattern 2).

Block:
    x = norm_in(h);  h += norm_post_attn(o_proj(attention(x)))
    x = norm_pre_ffn(h);  h += norm_post_ffn(down(gelu_tanh(gate(x)) * up(x)))
"""

from __future__ import annotations

from ...layers import GatedMLP
from .base import Architecture, flag, positive_number, register, window_size, windows_from_layer_types


class Gemma2Block:
    def __init__(self, load):
        self.input_norm = load.norm("input_norm", "input_layernorm")
        self.qkv = load.qkv()
        self.o_proj = load.o_proj()
        self.post_attn_norm = load.norm("post_attn_norm", "post_attention_layernorm")
        self.pre_ffn_norm = load.norm("pre_ffn_norm", "pre_feedforward_layernorm")
        self.post_ffn_norm = load.norm("post_ffn_norm", "post_feedforward_layernorm")
        self.mlp = GatedMLP(load.gate_up(), load.down(), "gelu_tanh")

    def forward(self, h, residual, attention, layer: int, all_reduce):
        if residual is None:
            residual, x = h, self.input_norm(h)
        else:
            x, residual = self.input_norm.add_(h, residual)
        o = all_reduce(self.o_proj(attention(self.qkv(x), layer)))  # [T, hidden]
        h = self.post_attn_norm(o, out=o)
        x, residual = self.pre_ffn_norm.add_(h, residual)
        m = all_reduce(self.mlp(x))
        return self.post_ffn_norm(m, out=m), residual


def _even(layer: int) -> bool:
    return layer % 2 == 0


def _softcap(value, what):
    return None if value is None else positive_number(value, what)


@register
class Gemma2(Architecture):
    name = "gemma2"
    hf_classes = ("Gemma2ForCausalLM",)
    gguf_name = "gemma2"
    gguf_layer_tensors = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                          "post_ffw_norm": "post_feedforward_layernorm"}  # fmt: skip
    norm_offset = 1.0
    block = Gemma2Block

    @classmethod
    def hf_fields(cls, cfg, source):
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{source}: unsupported hidden_activation {act!r} (supported: gelu_pytorch_tanh)")
        if flag(cfg, "use_bidirectional_attention", False, source):
            raise ValueError(f"{source}: use_bidirectional_attention is not supported (causal decoders only)")
        bias = flag(cfg, "attention_bias", False, source)
        scalar = positive_number(cfg.get("query_pre_attn_scalar", 256), f"{source}: query_pre_attn_scalar")
        return {"attention_bias": bias, "o_proj_bias": bias, "attn_scale": scalar**-0.5,
                "attn_softcap": _softcap(cfg.get("attn_logit_softcapping", 50.0), f"{source}: attn_logit_softcapping"),
                "final_softcap": _softcap(cfg.get("final_logit_softcapping", 30.0),
                                          f"{source}: final_logit_softcapping"),
                "tie_word_embeddings": flag(cfg, "tie_word_embeddings", True, source)}  # fmt: skip

    @classmethod
    def gguf_fields(cls, meta, names, source):
        # llama.cpp scales Gemma 2's queries by key_length^-1/2 (query_pre_attn_scalar of the
        # 2B and 9B models); the GGUF does not carry the scalar itself
        head_dim = meta.get("gemma2.attention.key_length")
        bias = "blk.0.attn_q.bias" in names
        return {"attention_bias": bias, "o_proj_bias": bias,
                "attn_scale": None if head_dim is None else positive_number(head_dim, f"{source}: key_length")**-0.5,
                # a file without the keys gets llama.cpp's defaults (the Gemma 2 values), as HF's
                "attn_softcap": _softcap(meta.get("gemma2.attn_logit_softcapping", 50.0),
                                         f"{source}: attn_logit_softcapping"),
                "final_softcap": _softcap(meta.get("gemma2.final_logit_softcapping", 30.0),
                                          f"{source}: final_logit_softcapping")}  # fmt: skip

    @classmethod
    def hf_layer_windows(cls, cfg, num_layers, source):
        # a config without the key gets HF's default (4096); null turns the window off
        return windows_from_layer_types(cfg, cfg.get("sliding_window", 4096), num_layers, source, _even)

    @classmethod
    def gguf_layer_windows(cls, meta, num_layers, source):
        # without the key: llama.cpp's default, Gemma 2's 4096 (HF's too)
        window = window_size(meta.get("gemma2.attention.sliding_window", 4096), f"{source}: gemma2.attention.sliding_window")
        return tuple(window if _even(i) else 0 for i in range(num_layers))

    @classmethod
    def layer_shapes(cls, cfg):
        h = (cfg.hidden_size,)
        return {"pre_feedforward_layernorm.weight": h, "post_feedforward_layernorm.weight": h}

    @classmethod
    def embed_scale(cls, cfg):
        return cfg.hidden_size**0.5
