"""The decoder of every architecture the runtime runs, from ringfuse ops and the shared
layers (``ringfuse.layers``): the embedding, the blocks of the model's architecture
(``architectures/<name>.py``), the final norm and the LM head; float or int8 linears; the
ring all-reduce under tensor parallelism (Megatron's layout, splits from
``layers.sharding``: heads and FFN columns split, o_proj and down_proj row-parallel,
embedding and LM head split over the vocab).

A decode step at batch 1 runs ~10 us of kernels per op, so per-call checks would dominate:
weights and norms are checked once at load (``ops.prepare_linear``,
``prepare_int8_weight_only_linear``, ``prepare_rms_norm``) and what the layers share
(positions, slots, block table) once per step (``layers.StepAttention``); the model runner
then replays each batch size's decode step as a CPU graph (``model_runner.DecodeGraph``).

Napkin math per decode token (SmolLM2-135M, 30 layers, hidden 576, ffn 1536): 134.5 M
weights -> 538 MB fp32 or 135 MB int8 read once per step, 2 * 134.5 M = 269 MFLOP; at
~47 GB/s from DRAM the floor is ~11.5 ms (fp32) / ~2.9 ms (int8) per step at batch 1,
and a batch of B tokens shares that read.
"""

from __future__ import annotations

import torch

from .. import ops
from ..layers import (QUANT_MODES, KVCache, Linear, LMHead, Shard, Step, StepAttention, VocabEmbedding, down_shards,
                      even_range, gate_up_shards, has_bias, head_split, o_proj_shards, qkv_shards, vocab_range,
                      vocab_shards)
from .config import ModelConfig
from .weights import release_freed_memory

__all__ = ["QUANT_MODES", "DecoderModel", "KVCache", "LayerLoader", "Linear", "Step", "head_split"]


class LayerLoader:
    """Loads one block's weights for this rank, from the source's HF-named tensors or from
    the converted-weights cache, and records each converted tensor under its cache key
    (``layers.{i}.<key>``). The architecture's block asks it for norms and the standard
    projections; which tensors and slices those are, the layers say (``qkv_shards``,
    ``gate_up_shards``, ...: ``sharding``'s splits, decided once in DecoderModel)."""

    def __init__(self, model: DecoderModel, weights, converted: dict | None):
        self.model, self.weights, self.converted = model, weights, converted
        self.prefix, self.key = "", ""  # HF name and cache key prefixes of the block being loaded
        cfg = model.config
        self.head_dim, self.hq, self.hkv = cfg.head_dim, model.hq, model.hkv

    def at(self, prefix: str, key: str) -> LayerLoader:
        self.prefix, self.key = prefix, key
        return self

    def get(self, name, dim=None, start=0, stop=None):
        return self.weights.get(self.prefix + name, dim, start, stop)

    def norm(self, key: str, name: str, *, size: int | None = None) -> ops.PreparedRMSNorm:
        """An RMSNorm over ``size`` (default: hidden) from tensor ``name``.weight, with the
        architecture's offset added in fp32 before the cast (Gemma's 1 + w)."""
        m, size = self.model, size or self.model.config.hidden_size
        key, offset = self.key + key, m.config.architecture.norm_offset
        if self.converted is None:
            w = self.get(name + ".weight")
            w = (w.float() + offset if offset else w).to(m.dtype).contiguous()
        else:
            w = self.converted.get(key)
        if w is None or tuple(w.shape) != (size,) or w.dtype != m.dtype:
            raise ValueError(f"{key}: expected a {m.dtype} [{size}] norm weight")
        m.tensors[key] = w
        # Gemma computes its norm in fp32 and rounds once (cast_mode "torch"); Llama rounds the
        # normalized x before the weight multiply ("llama"): the same in fp32
        return ops.prepare_rms_norm(w, m.config.rms_norm_eps, cast_mode="torch" if offset else "llama")

    def linear(self, key: str, shape: tuple[int, int], shards: tuple[list[Shard], list[Shard] | None]) -> Linear:
        """[N, K] from the layer's (weight, bias) shards, or from the converted cache."""
        m, key = self.model, self.key + key
        weight, bias_shards = shards
        if self.converted is None:
            layer = Linear.load(self.weights, weight, bias_shards, m.quant, m.dtype)
        else:
            prefix = key + "."
            parts = {k[len(prefix) :]: v for k, v in self.converted.items() if k.startswith(prefix)}
            # a cache written without a bias the model has (or with one it lacks) does not fit:
            # the engine converts again rather than run without it
            biased = has_bias(self.weights, bias_shards)
            if ("bias" in parts) != biased:
                raise ValueError(f"{key}: converted weights {'with' if 'bias' in parts else 'without'} a bias, the "
                                 f"model {'has one' if biased else 'has none'}")  # fmt: skip
            layer = Linear.from_parts(parts, m.quant, shape, key, m.dtype)
        m.linears[key] = layer
        return layer

    # the standard projections: this rank's slices, as the layers describe them; o_proj and
    # down are row-parallel (each rank's output is a partial sum, all-reduced), so their
    # bias is added on rank 0 alone, in its GEMM, and the sum holds it exactly once

    def qkv(self) -> Linear:  # [(hq + 2 hkv) D, hidden]: this rank's q heads, then its k and v heads
        m, cfg, D = self.model, self.model.config, self.head_dim
        return self.linear("qkv", ((self.hq + 2 * self.hkv) * D, cfg.hidden_size),
                           qkv_shards(self.prefix + "self_attn.", m.q_heads, m.kv_heads, D, cfg.attention_bias))

    def o_proj(self) -> Linear:  # [hidden, hq D]: this rank's columns
        m, cfg, D = self.model, self.model.config, self.head_dim
        return self.linear("o_proj", (cfg.hidden_size, self.hq * D),
                           o_proj_shards(self.prefix + "self_attn.", m.q_heads, D, cfg.hidden_size,
                                         cfg.o_proj_bias and m.rank == 0))  # fmt: skip

    def gate_up(self) -> Linear:  # [2 ffn / tp, hidden]: this rank's gate rows, then its up rows
        m, cfg = self.model, self.model.config
        f0, f1 = m.ffn_range
        return self.linear("gate_up", (2 * (f1 - f0), cfg.hidden_size),
                           gate_up_shards(self.prefix + "mlp.", m.ffn_range, cfg.mlp_bias))

    def down(self) -> Linear:  # [hidden, ffn / tp]
        m, cfg = self.model, self.model.config
        f0, f1 = m.ffn_range
        return self.linear("down", (cfg.hidden_size, f1 - f0),
                           down_shards(self.prefix + "mlp.", m.ffn_range, cfg.hidden_size, cfg.mlp_bias and m.rank == 0))


class DecoderModel:
    """Weights for this rank and the forward pass of a decoder whose blocks come from its
    architecture (``config.architecture.block``). ``tp_group``: a torch.distributed group
    (None with tp = 1)."""

    def __init__(self, weights, dtype: torch.dtype = torch.float32, quant: str = "none", tp_group=None,
                 converted: dict[str, torch.Tensor] | None = None, device: torch.device | None = None):  # fmt: skip
        """``converted``: this rank's tensors as ``converted_tensors()`` gave them (the
        converted-weights cache); then ``weights`` only supplies the config. A converted
        set that does not fit the config is a ValueError. ``device``: where the converted
        tensors are (a GPU: ``on_device``) and where the RoPE table and KV cache go."""
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        cfg: ModelConfig = weights.config
        arch = cfg.architecture
        self.config, self.dtype, self.quant, self.group = cfg, dtype, quant, tp_group
        self.device = torch.device(device or "cpu")
        self.rank, self.world = (0, 1)
        if tp_group is not None:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
        self.q_heads, self.kv_heads = head_split(cfg.num_heads, cfg.num_kv_heads, self.world, self.rank)
        self.hq, self.hkv = self.q_heads[1] - self.q_heads[0], self.kv_heads[1] - self.kv_heads[0]
        self.ffn_range = even_range(cfg.intermediate_size, self.world, self.rank, "FFN size")
        self.vocab_start, self.vocab_end = vocab_range(cfg.vocab_size, self.world, self.rank)
        self.tensors: dict[str, torch.Tensor] = {}  # converted norms and tables by cache key
        self.linears: dict[str, Linear] = {}  # converted linears by cache key

        load = LayerLoader(self, weights, converted)
        self.layers = []
        for i in range(cfg.num_layers):
            self.layers.append(arch.block(load.at(f"model.layers.{i}.", f"layers.{i}.")))
            release_freed_memory()
        load.at("model.", "")
        self.norm = load.norm("norm", "norm")
        head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        # The LM head is the largest matrix (21 % of SmolLM2's weights, 113 MB in fp32): int8
        # too when quantized, read in blocks of rows. [V / tp, hidden]
        hidden, rows = cfg.hidden_size, self.vocab_end - self.vocab_start
        load.at("", "")
        self.lm_head = load.linear("lm_head", (rows, hidden), (vocab_shards(head_name, self.vocab_start, self.vocab_end),
                                                               None))  # fmt: skip
        self.head = LMHead(self.lm_head, cfg.vocab_size, self.world, cfg.final_softcap)
        scale = arch.embed_scale(cfg)
        # HF multiplies by the factor rounded to the model's dtype (Gemma: sqrt(hidden))
        scale = None if scale is None else torch.tensor(scale, dtype=dtype, device=self.device)
        vocab = (self.vocab_start, self.vocab_end, dtype)
        if not cfg.tie_word_embeddings:
            table = converted.get("embed") if converted is not None else \
                weights.get("model.embed_tokens.weight", 0, self.vocab_start, self.vocab_end).to(dtype)  # fmt: skip
            if table is None or tuple(table.shape) != (rows, hidden):
                raise ValueError(f"embed: expected [{rows}, {hidden}]")
            self.tensors["embed"] = table
            self.embedding = VocabEmbedding(*vocab, table=table, scale=scale)
        elif quant == "none":
            self.embedding = VocabEmbedding(*vocab, table=self.lm_head.weight, scale=scale)  # one copy of the table
        else:  # rows dequantized from the int8 head: one copy of the table
            self.embedding = VocabEmbedding(*vocab, head=self.lm_head, scale=scale)
        release_freed_memory()
        inv = cfg.inv_freq()  # [D / 2]
        angles = torch.arange(cfg.max_position_embeddings, dtype=torch.float64)[:, None] * inv[None, :]
        self.cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(self.device)  # [max_pos, D]

    def on_device(self, weights, device: torch.device) -> DecoderModel:
        """This model with every weight copied to ``device`` (a GPU): the same converted
        tensors, so the same numbers; the layers take their CUDA paths from the tensors'
        device (Triton kernels, torch's GEMMs). ``weights``: the source it was loaded from
        (the config, and the biases the converted set is checked against)."""
        moved = {k: v.to(device) for k, v in self.converted_tensors().items()}
        return DecoderModel(weights, self.dtype, self.quant, self.group, converted=moved, device=device)

    def converted_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's converted weights by name, for the converted-weights cache."""
        out = dict(self.tensors)
        for key, layer in self.linears.items():
            out.update({f"{key}.{k}": v for k, v in layer.parts().items()})
        return out

    # ------------------------------------------------------------------------------------

    def new_kv_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        return KVCache(self.config.num_layers, num_blocks, self.hkv, block_size, self.config.head_dim, self.dtype,
                       self.device)  # fmt: skip

    def kv_bytes_per_token(self) -> int:
        return KVCache.bytes_per_token(self.config.num_layers, self.hkv, self.config.head_dim, self.dtype)

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            from ..distributed import all_reduce

            all_reduce(x, "sum", self.group)
        return x

    def embed_tokens(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.world > 1:
            h = self.embedding(ids, self._all_reduce)
            return h if out is None else out.copy_(h)
        return self.embedding(ids, out=out)

    def forward(self, step: Step, kv: KVCache, h: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the final norm, [R, hidden] for R = step.logit_rows (or all T).
        ``h``: the embedded tokens [T, hidden] when the caller has them (a DecodeGraph)."""
        cfg = self.config
        h = self.embed_tokens(step.input_ids) if h is None else h  # [T, hidden]
        attention = StepAttention(step, kv, self.cos_sin, self.hq, self.hkv, scale=cfg.attn_scale,
                                  softcap=cfg.attn_softcap, windows=cfg.layer_windows)  # fmt: skip
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer.forward(h, residual, attention, i, self._all_reduce)
        if step.logit_rows is not None:
            h, residual = h[step.logit_rows], residual[step.logit_rows]
        x, _ = self.norm.add_(h.contiguous(), residual.contiguous())
        return x

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, V] fp32 logits, soft-capped where the model does it (Gemma 2), in place."""
        return self.head.cap(logits)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, hidden] -> [R, vocab] fp32 (gathered over the ranks)."""
        if self.world == 1:
            return self.head(hidden)
        from ..distributed import all_gather

        return self.head(hidden, lambda t: all_gather(t, self.group))
