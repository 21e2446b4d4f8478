"""The Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2; linear biases
where the config has them), in one file, from ringfuse ops: fused RMSNorm with the
residual add, q/k/v in one GEMM, in-place RoPE, the KV cache written by ``write_kv``,
varlen flash attention for prefill and paged decode attention, gate and up in one GEMM
with the fused SwiGLU (``silu_mul``), float or int8 linears (ringfuse's GEMV-style kernels
at decode sizes, torch's GEMM for float prefill), and the ring all-reduce under tensor
parallelism (Megatron's layout: heads and FFN columns split, o_proj and down_proj
row-parallel, embedding and LM head split over the vocab).

A decode step at batch 1 runs ~10 us of kernels per op, so per-call checks would dominate:
weights and norms are checked once at load (``ops.prepare_linear``,
``prepare_int8_weight_only_linear``, ``prepare_rms_norm``) and what the layers share
(positions, slots, block table) once per step (``ops.PagedDecodePlan``); the engine then
replays each batch size's decode step as a CPU graph (``DecodeGraph``, below).

Tokens of all sequences in a step are packed along one axis T (no padding):
  prefill: T = sum of prompt lengths, attention over each prompt (cu_seqlens);
  decode:  T = B, one new token per sequence, attention over its pages of the KV cache.

Napkin math per decode token (SmolLM2-135M, 30 layers, hidden 576, ffn 1536): 134.5 M
weights -> 538 MB fp32 or 135 MB int8 read once per step, 2 * 134.5 M = 269 MFLOP; at
~47 GB/s from DRAM the floor is ~11.5 ms (fp32) / ~2.9 ms (int8) per step at batch 1,
and a batch of B tokens shares that read.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .. import ops
from ..nn import quantize_weight
from .config import ModelConfig
from .weights import release_freed_memory

QUANT_MODES = ("none", "w8a16", "w8a8")
SMALL_M = 8  # rows up to which float linears take ringfuse's GEMV-style kernel


def head_split(num_heads: int, num_kv_heads: int, world: int, rank: int):
    """(q heads [start, stop), kv heads [start, stop)) of this rank. With tp <= the KV
    heads, ranks take whole GQA groups (a KV head and its query heads), as evenly as they
    go: SmolLM2's 3 groups of 3 over tp = 2 are 1 + 2 groups, which keeps the GQA mapping
    uniform on each rank (9 query heads do not split in two). With more ranks than KV
    heads, the KV heads are replicated (distributed.attention_head_split)."""
    if world <= num_kv_heads:
        group = num_heads // num_kv_heads
        k0, k1 = rank * num_kv_heads // world, (rank + 1) * num_kv_heads // world
        return (k0 * group, k1 * group), (k0, k1)
    from ..distributed import attention_head_split

    return attention_head_split(num_heads, num_kv_heads, world, rank)


class Linear:
    """y = x W^T + b: W float [N, K] (torch GEMM), or int8 per output channel with fp32
    scales (w8a16: ringfuse's weight-only kernels; w8a8: activations quantized per token,
    int8 x int8 GEMM with the scales in its epilogue)."""

    def __init__(self, weight, bias: torch.Tensor | None, quant: str, dtype: torch.dtype):
        """``weight``: [N, K] float, or an iterator of its row blocks, taken one at a time so
        that a large matrix (the LM head) is never whole in fp32 when it is quantized."""
        bias = None if bias is None else bias.to(dtype if quant == "none" else torch.float32).contiguous()
        blocks = [weight] if isinstance(weight, torch.Tensor) else weight
        if quant == "none":
            parts = [b.to(dtype) for b in blocks]
            self._setup(quant, {"weight": parts[0].contiguous() if len(parts) == 1 else torch.cat(parts), "bias": bias})
        else:
            parts = [quantize_weight(b.float()) for b in blocks]  # ([rows, K] int8, [rows] fp32) each
            w_q = parts[0][0] if len(parts) == 1 else torch.cat([q for q, _ in parts])
            w_scale = parts[0][1] if len(parts) == 1 else torch.cat([s for _, s in parts])
            self._setup(quant, {"w_q": w_q, "w_scale": w_scale, "bias": bias})

    @classmethod
    def from_parts(cls, parts: dict, quant: str, shape: tuple[int, int], key: str, dtype: torch.dtype) -> Linear:
        """A Linear from the tensors ``parts()`` gave (the converted-weights cache), checked
        against the expected [N, K]."""
        self = cls.__new__(cls)
        names = {"weight"} if quant == "none" else {"w_q", "w_scale"}
        if not names <= parts.keys():
            raise ValueError(f"{key}: missing {sorted(names - parts.keys())}")
        main = parts["weight" if quant == "none" else "w_q"]
        if tuple(main.shape) != shape or (quant != "none" and tuple(parts["w_scale"].shape) != shape[:1]):
            raise ValueError(f"{key}: shape {tuple(main.shape)}, expected {shape}")
        if parts.get("bias") is not None and tuple(parts["bias"].shape) != shape[:1]:
            raise ValueError(f"{key}: bias shape {tuple(parts['bias'].shape)}, expected {shape[:1]}")
        want = {"weight": dtype, "bias": dtype} if quant == "none" else \
            {"w_q": torch.int8, "w_scale": torch.float32, "bias": torch.float32}  # fmt: skip
        bad = [k for k, v in parts.items() if v is not None and v.dtype != want.get(k, v.dtype)]
        if bad or not parts.keys() <= want.keys():
            raise ValueError(f"{key}: unexpected tensors or dtypes {[(k, parts[k].dtype) for k in parts]}")
        self._setup(quant, {"bias": None, **parts})
        return self

    def _setup(self, quant: str, parts: dict) -> None:
        self.quant, self.bias = quant, parts["bias"]
        if quant == "none":
            self.weight = parts["weight"]  # [N, K]
            self.out_features, self.in_features = self.weight.shape
            self._small = ops.prepare_linear(self.weight, self.bias)  # weights checked once
            return
        self.w_q, self.w_scale = parts["w_q"], parts["w_scale"]  # [N, K] int8, [N] fp32
        self.out_features, self.in_features = self.w_q.shape
        self.packed = ops.pack_int8_weight(self.w_q) if quant == "w8a8" else None
        if quant == "w8a16":
            self._w8a16 = ops.prepare_int8_weight_only_linear(self.w_q, self.w_scale, self.bias)

    def parts(self) -> dict[str, torch.Tensor]:
        """The converted tensors, as ``from_parts`` takes them back."""
        out = {"weight": self.weight} if self.quant == "none" else {"w_q": self.w_q, "w_scale": self.w_scale}
        return out if self.bias is None else {**out, "bias": self.bias}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        if self.quant == "none":
            # decode-sized M: ringfuse's bandwidth-bound kernel (MKL streams the weights at a
            # third of the DRAM bandwidth on AMD hosts); prefill-sized M: torch's GEMM
            if x.shape[0] <= SMALL_M and x.is_cpu:
                return self._small(x)
            return F.linear(x, self.weight, self.bias)
        if self.quant == "w8a16":
            return self._w8a16(x)
        x_q, x_s = ops.quantize_per_token(x)
        return ops.int8_gemm(x_q, self.w_q, x_s, self.w_scale, self.bias, out_dtype=x.dtype, packed=self.packed)


@dataclasses.dataclass
class Layer:
    input_norm: ops.PreparedRMSNorm  # weight [hidden], checked once
    qkv: Linear  # [(hq + 2 hkv) * D, hidden]: this rank's q heads, then its k and v heads (bias alike)
    o_proj: Linear  # [hidden, hq * D]: this rank's columns; bias [hidden] on rank 0 only
    post_norm: ops.PreparedRMSNorm
    gate_up: Linear  # [2 * ffn / tp, hidden]: this rank's gate rows, then its up rows (bias alike)
    down: Linear  # [hidden, ffn / tp]; bias [hidden] on rank 0 only


@dataclasses.dataclass
class Step:
    """What one forward pass computes. Token-major tensors are [T]."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: where each token's k/v go in the cache
    # prefill: sequences packed along T
    cu_seqlens: torch.Tensor | None = None  # [B + 1] int32
    max_seqlen: int = 0
    # decode: one token per sequence
    block_table: torch.Tensor | None = None  # [B, max_blocks] int32
    seq_lens: torch.Tensor | None = None  # [B] int32, the new token included
    # rows of the hidden states whose logits are wanted (None: all T)
    logit_rows: torch.Tensor | None = None  # [R] int64
    # prefill over cached prefixes: every prompt's whole context, read back from the cache
    context_slots: torch.Tensor | None = None  # [Tk] int64: the cache slots of each context, packed
    cu_seqlens_context: torch.Tensor | None = None  # [B + 1] int32

    @property
    def is_prefill(self) -> bool:
        return self.cu_seqlens is not None


class KVCache:
    """Paged KV cache: per layer k, v [num_blocks, Hkv, block_size, D] (this rank's heads).
    Pages are allocated (not touched) up front; untouched pages cost no memory."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype):  # fmt: skip
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(num_layers)]


class LlamaModel:
    """Weights for this rank and the forward pass. ``tp_group``: a torch.distributed group
    (None with tp = 1)."""

    def __init__(self, weights, dtype: torch.dtype = torch.float32, quant: str = "none", tp_group=None,
                 converted: dict[str, torch.Tensor] | None = None):  # fmt: skip
        """``converted``: this rank's tensors as ``converted_tensors()`` gave them (the
        converted-weights cache); then ``weights`` only supplies the config. A converted
        set that does not fit the config is a ValueError."""
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        cfg: ModelConfig = weights.config
        self.config, self.dtype, self.quant, self.group = cfg, dtype, quant, tp_group
        self.rank, self.world = (0, 1)
        if tp_group is not None:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
        D = cfg.head_dim
        (q0, q1), (k0, k1) = head_split(cfg.num_heads, cfg.num_kv_heads, self.world, self.rank)
        if cfg.intermediate_size % self.world:
            raise ValueError(f"tensor-parallel size {self.world} must divide the FFN size {cfg.intermediate_size}")
        self.hq, self.hkv = q1 - q0, k1 - k0
        f = cfg.intermediate_size // self.world
        f0, f1 = self.rank * f, (self.rank + 1) * f
        self.ffn = f
        # the vocab in contiguous ranges of ceil(V / tp) rows per rank
        per = -(-cfg.vocab_size // self.world)
        self.vocab_start, self.vocab_end = self.rank * per, min(cfg.vocab_size, (self.rank + 1) * per)

        def get(name, dim=None, start=0, stop=None):
            return weights.get(name, dim, start, stop)

        hidden = cfg.hidden_size

        def norm(key, name):  # weight [hidden]
            w = get(name).to(dtype).contiguous() if converted is None else converted.get(key)
            if w is None or tuple(w.shape) != (hidden,) or w.dtype != dtype:
                raise ValueError(f"{key}: expected a {dtype} [{hidden}] norm weight")
            return ops.prepare_rms_norm(w, cfg.rms_norm_eps, cast_mode="llama")

        def linear(key, shape, weight_fn, bias=None):  # [N, K]; bias [N] or None
            if converted is None:
                return Linear(weight_fn(), bias, quant, dtype)
            prefix = key + "."
            parts = {k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)}
            # a cache written without a bias the model has (or with one it lacks) does not fit:
            # the engine converts again rather than run without it
            if ("bias" in parts) != (bias is not None):
                raise ValueError(f"{key}: converted weights {'with' if 'bias' in parts else 'without'} a bias, the "
                                 f"model {'has none' if bias is None else 'has one'}")  # fmt: skip
            return Linear.from_parts(parts, quant, shape, key, dtype)

        def bias(on, rows_of):  # this rank's rows of the fused projections' biases, or None
            """``rows_of``: [(name, (start, stop))]. Biases are [N] and tiny, read even when
            the converted weights are used (to check the cache has them). A missing one is
            zeros (what HF initializes it to), all missing is no bias."""
            if not on or not any(weights.has(n) for n, _ in rows_of):
                return None
            return torch.cat([get(n, 0, r0, r1) if weights.has(n) else torch.zeros(r1 - r0)
                              for n, (r0, r1) in rows_of])  # fmt: skip

        # o_proj and down are row-parallel (each rank's output is a partial sum, all-reduced):
        # their bias is added on rank 0 alone, in its GEMM, so the sum holds it exactly once
        row_bias = self.rank == 0

        self.layers = []
        for i in range(cfg.num_layers):
            p, key = f"model.layers.{i}.", f"layers.{i}."
            a = p + "self_attn."
            q_rows, kv_rows = (q0 * D, q1 * D), (k0 * D, k1 * D)
            m = p + "mlp."
            self.layers.append(Layer(
                input_norm=norm(key + "input_norm", p + "input_layernorm.weight"),
                qkv=linear(key + "qkv", ((self.hq + 2 * self.hkv) * D, hidden),
                           lambda: torch.cat([get(a + "q_proj.weight", 0, *q_rows), get(a + "k_proj.weight", 0, *kv_rows),
                                              get(a + "v_proj.weight", 0, *kv_rows)]),
                           bias(cfg.attention_bias, [(a + "q_proj.bias", q_rows), (a + "k_proj.bias", kv_rows),
                                                     (a + "v_proj.bias", kv_rows)])),
                o_proj=linear(key + "o_proj", (hidden, self.hq * D), lambda: get(a + "o_proj.weight", 1, q0 * D, q1 * D),
                              bias(cfg.o_proj_bias and row_bias, [(a + "o_proj.bias", (0, hidden))])),
                post_norm=norm(key + "post_norm", p + "post_attention_layernorm.weight"),
                gate_up=linear(key + "gate_up", (2 * f, hidden),
                               lambda: torch.cat([get(m + "gate_proj.weight", 0, f0, f1), get(m + "up_proj.weight", 0, f0, f1)]),
                               bias(cfg.mlp_bias, [(m + "gate_proj.bias", (f0, f1)), (m + "up_proj.bias", (f0, f1))])),
                down=linear(key + "down", (hidden, f), lambda: get(m + "down_proj.weight", 1, f0, f1),
                            bias(cfg.mlp_bias and row_bias, [(m + "down_proj.bias", (0, hidden))])),
            ))  # fmt: skip
            release_freed_memory()
        self.norm = norm("norm", "model.norm.weight")
        head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        # The LM head is the largest matrix (21 % of SmolLM2's weights, 113 MB in fp32): int8
        # too when quantized, read in blocks of 4096 rows. [V / tp, hidden]
        head_rows = range(self.vocab_start, self.vocab_end, 4096)
        self.lm_head = linear("lm_head", (self.vocab_end - self.vocab_start, hidden),
                              lambda: (get(head_name, 0, r, min(r + 4096, self.vocab_end)) for r in head_rows))
        if not cfg.tie_word_embeddings:
            self.embed = converted.get("embed") if converted is not None else \
                get("model.embed_tokens.weight", 0, self.vocab_start, self.vocab_end).to(dtype)  # fmt: skip
            if self.embed is None or tuple(self.embed.shape) != (self.vocab_end - self.vocab_start, hidden):
                raise ValueError(f"embed: expected [{self.vocab_end - self.vocab_start}, {hidden}]")
        elif quant == "none":
            self.embed = self.lm_head.weight  # one copy of the table
        else:
            self.embed = None  # rows are dequantized from the int8 head: one copy of the table
        release_freed_memory()
        inv = cfg.inv_freq()  # [D / 2]
        angles = torch.arange(cfg.max_position_embeddings, dtype=torch.float64)[:, None] * inv[None, :]
        self.cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).float()  # [max_pos, D]

    def converted_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's converted weights by name, for the converted-weights cache."""
        out = {"norm": self.norm.weight}
        for i, layer in enumerate(self.layers):
            out[f"layers.{i}.input_norm"] = layer.input_norm.weight
            out[f"layers.{i}.post_norm"] = layer.post_norm.weight
            for name in ("qkv", "o_proj", "gate_up", "down"):
                out.update({f"layers.{i}.{name}.{k}": v for k, v in getattr(layer, name).parts().items()})
        out.update({f"lm_head.{k}": v for k, v in self.lm_head.parts().items()})
        if not self.config.tie_word_embeddings:
            out["embed"] = self.embed
        return out

    # ------------------------------------------------------------------------------------

    def new_kv_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        return KVCache(self.config.num_layers, num_blocks, self.hkv, block_size, self.config.head_dim, self.dtype)

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            from ..distributed import all_reduce

            all_reduce(x, "sum", self.group)
        return x

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.vocab_end - self.vocab_start)
        if self.world > 1:
            local = torch.where(mine, local, torch.zeros_like(local))
        if self.embed is not None:
            h = self.embed[local]
        else:
            h = (self.lm_head.w_q[local].float() * self.lm_head.w_scale[local, None]).to(self.dtype)
        if self.world > 1:
            h *= mine[:, None].to(h.dtype)
            self._all_reduce(h)
        return h

    def forward(self, step: Step, kv: KVCache, h: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the final norm, [R, hidden] for R = step.logit_rows (or all T).
        ``h``: the embedded tokens [T, hidden] when the caller has them (a DecodeGraph)."""
        cfg = self.config
        T, D = step.input_ids.shape[0], cfg.head_dim
        qn = self.hq * D
        h = self.embed_tokens(step.input_ids) if h is None else h  # [T, hidden]
        residual = None
        decode = context = None
        if step.context_slots is not None:  # (block, offset) of every context token
            context = (step.context_slots // kv.block_size, step.context_slots % kv.block_size)
        if not step.is_prefill:  # what the layers share, checked once per step
            decode = ops.PagedDecodePlan(kv.k[0], kv.v[0], self.cos_sin, step.positions, step.slot_mapping,
                                         step.block_table, step.seq_lens, self.hq)  # fmt: skip
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual = h
                x = ops.rms_norm(h, layer.input_norm.weight, cfg.rms_norm_eps, cast_mode="llama")
            else:  # residual += h; x = norm(residual)
                x, residual = layer.input_norm.add_(h, residual)
            qkv = layer.qkv(x)  # [T, (Hq + 2 Hkv) D]
            if decode is not None:  # rotary, k/v into the cache, attention over the pages
                o = decode.run_packed(qkv, kv.k[i], kv.v[i])
            else:
                heads = qkv.view(T, self.hq + 2 * self.hkv, D)  # [T, Hq + 2 Hkv, D]
                q, k, v = heads[:, : self.hq], heads[:, self.hq : self.hq + self.hkv], heads[:, self.hq + self.hkv :]
                ops.rotary_embedding(q, k, step.positions, self.cos_sin)
                ops.write_kv(k, v, kv.k[i], kv.v[i], step.slot_mapping)
                cu_k = step.cu_seqlens
                if context is not None:  # cached prefixes: the whole contexts from the cache
                    blk, off = context
                    k, v, cu_k = kv.k[i][blk, :, off], kv.v[i][blk, :, off], step.cu_seqlens_context  # [Tk, Hkv, D]
                o = ops.attention_varlen(q, k, v, step.cu_seqlens, cu_k, max_seqlen_q=step.max_seqlen,
                                         causal=True)  # fmt: skip
            h = self._all_reduce(layer.o_proj(o.view(T, qn)))  # [T, hidden]
            x, residual = layer.post_norm.add_(h, residual)
            gate_up = layer.gate_up(x)  # [T, 2 ffn]
            act = ops.silu_mul(gate_up)  # [T, ffn]
            h = self._all_reduce(layer.down(act))
        if step.logit_rows is not None:
            h, residual = h[step.logit_rows], residual[step.logit_rows]
        x, _ = self.norm.add_(h.contiguous(), residual.contiguous())
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, hidden] -> [R, vocab] fp32 (gathered over the ranks)."""
        local = self.lm_head(hidden).float()  # [R, V / tp]
        if self.world == 1:
            return local
        from ..distributed import all_gather

        per = -(-self.config.vocab_size // self.world)
        if local.shape[1] < per:  # the last rank's range is short: pad it
            local = F.pad(local, (0, per - local.shape[1]), value=float("-inf"))
        full = all_gather(local.contiguous(), self.group).view(self.world, -1, per)
        return full.permute(1, 0, 2).reshape(local.shape[0], -1)[:, : self.config.vocab_size]


class DecodeGraph:
    """A decode step of ``batch`` sequences captured as a CPU graph (ops.capture_cpu_graph):
    the first ``run`` captures the layers and the LM head on static input buffers, later
    runs copy the step's inputs into them and replay the recorded kernels, without the
    per-op Python. Bitwise the same logits as ``model.logits(model.forward(step, kv))``.
    Single rank only (the all-reduce is not a recorded kernel)."""

    def __init__(self, model: LlamaModel, kv: KVCache, batch: int, max_blocks: int):
        self.model, self.kv, self.graph, self.out = model, kv, None, None
        self.h = torch.zeros(batch, model.config.hidden_size, dtype=model.dtype)  # [B, hidden]
        self.step = Step(input_ids=torch.zeros(batch, dtype=torch.int64), positions=torch.zeros(batch, dtype=torch.int64),
                         slot_mapping=torch.zeros(batch, dtype=torch.int64),
                         block_table=torch.zeros(batch, max_blocks, dtype=torch.int32),
                         seq_lens=torch.ones(batch, dtype=torch.int32))  # fmt: skip

    def run(self, step: Step) -> torch.Tensor:
        """[B, V] fp32 logits of this decode step."""
        s, width = self.step, step.block_table.shape[1]
        self.h.copy_(self.model.embed_tokens(step.input_ids))
        s.positions.copy_(step.positions)
        s.slot_mapping.copy_(step.slot_mapping)
        s.block_table[:, :width].copy_(step.block_table)
        s.block_table[:, width:] = 0
        s.seq_lens.copy_(step.seq_lens)
        if self.graph is None:
            with ops.capture_cpu_graph() as g:  # runs this step's kernels while recording them
                self.out = self.model.lm_head(self.model.forward(s, self.kv, h=self.h))  # [B, V / tp]
            self.graph = g
        else:
            self.graph.replay()
        return self.out.float()

