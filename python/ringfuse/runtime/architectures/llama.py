"""Llama and the families that share its block: Llama 2/3 (with Llama 3.1 RoPE scaling,
optional attention / MLP biases), SmolLM2 and TinyLlama (Llama checkpoints), Mistral
(no biases) and Qwen2 (q/k/v biases).

Block (pre-norm, SwiGLU, neox RoPE):
    x = RMSNorm(h);  h += o_proj(attention(RoPE(q), RoPE(k), v))
    x = RMSNorm(h);  h += down(silu(gate(x)) * up(x))
Residual adds are fused into the next norm (``add_rms_norm_``); under tensor parallelism
o_proj and down are row-parallel, their partial sums all-reduced.
"""

from __future__ import annotations

from ...layers import GatedMLP
from .base import Architecture, flag, register, window_size, windows_from_layer_types


class LlamaBlock:
    def __init__(self, load):
        self.input_norm = load.norm("input_norm", "input_layernorm")
        self.qkv = load.qkv()
        self.o_proj = load.o_proj()
        self.post_norm = load.norm("post_norm", "post_attention_layernorm")
        self.mlp = GatedMLP(load.gate_up(), load.down(), "silu")

    def attend(self, x, attention, layer: int):
        """[T, hidden] -> o_proj's input [T, Hq D]: q/k/v, RoPE, the cache, attention."""
        return attention(self.qkv(x), layer)

    def forward(self, h, residual, attention, layer: int, all_reduce):
        """(h, residual) [T, hidden] each -> the block's output and the new residual; the
        block's residual add is left to the next norm (residual None: the first block)."""
        if residual is None:
            residual, x = h, self.input_norm(h)
        else:  # residual += h; x = norm(residual)
            x, residual = self.input_norm.add_(h, residual)
        h = all_reduce(self.o_proj(self.attend(x, attention, layer)))  # [T, hidden]
        x, residual = self.post_norm.add_(h, residual)
        return all_reduce(self.mlp(x)), residual


@register
class Llama(Architecture):
    name = "llama"
    hf_classes = ("LlamaForCausalLM",)
    gguf_name = "llama"  # Mistral GGUFs say "llama" too
    gguf_permuted_qk = True
    block = LlamaBlock
    hf_activation = ("hidden_act", ("silu", "swish"))  # SwiGLU (HF maps both names to SiLU)

    @classmethod
    def hf_fields(cls, cfg, source):
        # HF's LlamaAttention: attention_bias covers q/k/v and o; mlp_bias gate/up/down
        bias = flag(cfg, "attention_bias", False, source)
        return {"attention_bias": bias, "o_proj_bias": bias, "mlp_bias": flag(cfg, "mlp_bias", False, source)}

    @classmethod
    def gguf_fields(cls, meta, names, source):  # biases as llama.cpp takes them: each optional
        return {"attention_bias": "blk.0.attn_q.bias" in names, "o_proj_bias": "blk.0.attn_output.bias" in names,
                "mlp_bias": "blk.0.ffn_gate.bias" in names}  # fmt: skip


@register
class Mistral(Llama):
    name = "mistral"
    hf_classes = ("MistralForCausalLM",)
    gguf_name = None

    @classmethod
    def hf_fields(cls, cfg, source):
        return {}  # no biases, whatever the config says (HF's MistralAttention has none)

    @classmethod
    def hf_layer_windows(cls, cfg, num_layers, source):
        # HF's Mistral applies sliding_window to every layer (layer_types is ignored); a config
        # without the key gets MistralConfig's default, 4096, and null means no window
        w = cfg.get("sliding_window", 4096)
        return () if w is None else (window_size(w, f"{source}: sliding_window"),) * num_layers


@register
class Qwen2(Llama):
    name = "qwen2"
    hf_classes = ("Qwen2ForCausalLM",)
    gguf_name = "qwen2"
    gguf_permuted_qk = False

    @classmethod
    def hf_fields(cls, cfg, source):
        return {"attention_bias": True}  # q/k/v always, o and the MLP never

    @classmethod
    def gguf_fields(cls, meta, names, source):
        return {"attention_bias": "blk.0.attn_q.bias" in names}

    @classmethod
    def hf_layer_windows(cls, cfg, num_layers, source):
        return qwen_layer_windows(cfg, num_layers, source)


def qwen_layer_windows(cfg, num_layers, source):
    """Qwen2 / Qwen3: sliding_window only with use_sliding_window, on the layers from
    max_window_layers on (HF's default layer_types)."""
    if not flag(cfg, "use_sliding_window", False, source):
        return ()
    first = cfg.get("max_window_layers", 28)
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"{source}: max_window_layers must be an int >= 0, got {first!r}")
    return windows_from_layer_types(cfg, cfg.get("sliding_window"), num_layers, source, lambda i: i >= first)
