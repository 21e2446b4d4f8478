"""Tensor-parallel layers (Megatron-LM's layout) on ringfuse's ring collectives.

- ``ColumnParallelLinear``: rank r holds rows [r n, (r+1) n) of W [N, K] (n = N / tp) and
  computes y_r = x W_r^T + b_r; ``gather_output=True`` all-gathers [..., N].
- ``RowParallelLinear``: rank r holds columns [r k, (r+1) k) of W (k = K / tp); the partial
  products x_r W_r^T are summed by the ring all-reduce, then the bias is added once.
- ``VocabParallelEmbedding``: the vocab split in contiguous ranges of ceil(V / tp) rows
  (the last padded with zero rows no id selects); ids outside a rank's range give zeros
  there and the all-reduce sums the one nonzero row.
- ``ParallelLMHead``: vocab-sharded logits (the runtime's ``layers.LMHead``); gathered to
  [..., V], or reduced to the argmax without gathering (two tiny all-gathers of each rank's
  best value and index).
- ``ParallelGatedMLP``: gate and up in one column-parallel GEMM, down row-parallel, run by
  the runtime's ``layers.GatedMLP`` on this rank's shards.

A column-parallel layer followed by a row-parallel one (an MLP, attention's qkv then o)
needs one all-reduce per pair. Inference only: the collectives do not take part in autograd.
``quant="w8a8" | "w8a16"`` keeps each rank's shard in int8 (per output channel). The
linears are adapters over the runtime's ``layers.Linear`` (ringfuse's GEMV at decode
sizes, torch's GEMM above, the int8 kernels), and every split comes from
``layers.sharding``: a TP HF model and the runtime compute a shard the same way.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..layers import GatedMLP, Linear, LMHead, VocabEmbedding
from ..layers.sharding import even_range, head_split, vocab_range
from ..nn import quantize_weight
from . import allreduce as ring


def group_rank_world(group=None) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("tensor parallel layers need torch.distributed: call ringfuse.distributed.init() first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"tensor parallel: this process (global rank {dist.get_rank()}) is not a member of the "
                         "group passed")  # fmt: skip
    return rank, dist.get_world_size(group)


def _gather_last_dim(y: torch.Tensor, group, world: int) -> torch.Tensor:
    """[..., n] on every rank -> [..., world * n], rank r's block at r."""
    flat = ring.all_gather(y.contiguous(), group)  # [world * numel]
    return flat.view(world, *y.shape).movedim(0, -2).reshape(*y.shape[:-1], world * y.shape[-1])


class _ShardedLinear(torch.nn.Module):
    """This rank's shard, computed by a ``layers.Linear`` over the module's tensors. Float
    shards keep ``weight`` / ``bias`` Parameters (HF's state_dict names, shard loading);
    quantized ones the buffers ``weight_q`` (int8 [n, k]), ``weight_scale`` (fp32 [n]) and
    ``bias`` (fp32 [n]). The Linear is made at the first call and again after a load
    through ``_load_shard`` or the shard loaders; load_state_dict writes the tensors in
    place, which its prepared kernels see (they re-check weights whose version moved)."""

    bias_in_shard = True  # False: ``bias`` is added after the reduction (row parallel)

    def _init_local(self, out_f, in_f, bias, quant, device, dtype):
        if quant not in (None, "w8a8", "w8a16"):
            raise ValueError(f"{type(self).__name__}: quant must be None, 'w8a8' or 'w8a16', got {quant!r}")
        self.quant = quant
        self._linear = None
        if quant is None:
            self.weight = torch.nn.Parameter(torch.empty(out_f, in_f, device=device, dtype=dtype), requires_grad=False)
            self.bias = torch.nn.Parameter(torch.zeros(out_f, device=device, dtype=dtype), requires_grad=False) \
                if bias else None  # fmt: skip
            torch.nn.init.normal_(self.weight, std=in_f**-0.5)
        else:
            self.weight = None
            self.register_buffer("weight_q", torch.zeros(out_f, in_f, device=device, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(out_f, device=device, dtype=torch.float32))
            if bias:
                self.register_buffer("bias", torch.zeros(out_f, device=device, dtype=torch.float32))
            else:
                self.bias = None

    def _local(self, x):
        """[..., k] -> [..., n]: this rank's x W^T + b."""
        if self._linear is None:
            bias = self.bias if self.bias_in_shard else None
            if self.quant is None:
                self._linear = Linear(self.weight, bias, "none", self.weight.dtype)  # shares the Parameters
            else:
                parts = {"w_q": self.weight_q, "w_scale": self.weight_scale, "bias": bias}
                self._linear = Linear.from_parts(parts, self.quant, tuple(self.weight_q.shape), type(self).__name__,
                                                 torch.float32)  # fmt: skip
        y = self._linear(x.reshape(-1, x.shape[-1]))  # Linear takes [T, k]
        return y.view(*x.shape[:-1], y.shape[-1])  # (not -1: T may be 0)

    def _load_shard(self, weight, bias):
        with torch.no_grad():
            if self.quant is None:
                self.weight.copy_(weight)
                if bias is not None:
                    self.bias.copy_(bias)
            else:
                w_q, w_scale = quantize_weight(weight.float())
                self.weight_q.copy_(w_q)
                self.weight_scale.copy_(w_scale)
                if bias is not None:
                    self.bias.copy_(bias.float())
        self._linear = None


class ColumnParallelLinear(_ShardedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 group=None, dtype=None, device=None, quant: str | None = None, *,
                 out_per_rank: int | None = None):  # fmt: skip
        """``out_per_rank``: rows this rank holds when they are not an even split of
        out_features (replicated KV heads); gather_output then is not available."""
        super().__init__()
        self.group = group
        self.rank, self.world = group_rank_world(group)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        if out_per_rank is None:
            start, stop = even_range(out_features, self.world, self.rank, "out_features")
            self.out_per_rank = stop - start
        elif gather_output:
            raise ValueError("ColumnParallelLinear: gather_output needs an even split (no out_per_rank)")
        else:
            self.out_per_rank = out_per_rank
        self.row_start = self.rank * self.out_per_rank  # from_linear(rows=) moves it
        self._init_local(self.out_per_rank, in_features, bias, quant, device, dtype)

    def shard_slices(self) -> dict[str, tuple[int, int, int]]:
        """{parameter: (dim, start, stop)} of the full layer's tensors this rank holds."""
        rows = (0, self.row_start, self.row_start + self.out_per_rank)
        if self.quant is None:
            return {"weight": rows, "bias": rows}
        return {"weight_q": rows, "weight_scale": rows, "bias": rows}

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group=None, gather_output: bool = False, quant=None,
                    rows: tuple[int, int] | None = None):  # fmt: skip
        """This rank's rows of a full ``linear`` (the same on every rank): the even split,
        or ``rows=(start, stop)``."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"from_linear: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output, group,
                  dtype=w.dtype, device=w.device, quant=quant,
                  out_per_rank=None if rows is None else rows[1] - rows[0])  # fmt: skip
        start = new.rank * new.out_per_rank if rows is None else rows[0]
        new.row_start = start
        sel = slice(start, start + new.out_per_rank)
        new._load_shard(w[sel], linear.bias.detach()[sel] if linear.bias is not None else None)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ColumnParallelLinear: input must be [..., {self.in_features}], got {tuple(x.shape)}")
        y = self._local(x)  # [..., out / tp]
        return _gather_last_dim(y, self.group, self.world) if self.gather_output and self.world > 1 else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} ({self.out_per_rank} on rank "
                f"{self.rank} of {self.world}), gather_output={self.gather_output}, quant={self.quant}")  # fmt: skip


class RowParallelLinear(_ShardedLinear):
    bias_in_shard = False  # added once, after the all-reduce

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 group=None, dtype=None, device=None, quant: str | None = None, *,
                 in_per_rank: int | None = None):  # fmt: skip
        """``in_per_rank``: columns this rank holds when they are not an even split of
        in_features (attention heads split by whole GQA groups); input_is_parallel then."""
        super().__init__()
        self.group = group
        self.rank, self.world = group_rank_world(group)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, input_is_parallel
        if in_per_rank is None:
            start, stop = even_range(in_features, self.world, self.rank, "in_features")
            self.in_per_rank = stop - start
        elif not input_is_parallel:
            raise ValueError("RowParallelLinear: an uneven split (in_per_rank) needs input_is_parallel=True")
        else:
            self.in_per_rank = in_per_rank
        self.col_start = self.rank * self.in_per_rank  # from_linear(cols=) moves it
        # the bias is added once, after the reduction, so the shard holds none
        self._init_local(out_features, self.in_per_rank, False, quant, device, dtype)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None  # fmt: skip

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group=None, input_is_parallel: bool = True, quant=None,
                    cols: tuple[int, int] | None = None):  # fmt: skip
        """This rank's columns of a full ``linear`` (the same on every rank): the even split,
        or ``cols=(start, stop)``."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"from_linear: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, input_is_parallel, group,
                  dtype=w.dtype, device=w.device, quant=quant,
                  in_per_rank=None if cols is None else cols[1] - cols[0])  # fmt: skip
        if cols is not None:
            new.col_start = cols[0]
        new._load_shard(w[:, new.col_start : new.col_start + new.in_per_rank].contiguous(), None)
        if linear.bias is not None:
            with torch.no_grad():
                new.bias.copy_(linear.bias.detach())
        return new

    def shard_slices(self) -> dict[str, tuple[int, int, int]]:
        start = self.col_start
        if self.quant is None:
            return {"weight": (1, start, start + self.in_per_rank)}
        return {"weight_q": (1, start, start + self.in_per_rank)}  # per-row scales: whole (of these columns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = self.in_per_rank if self.input_is_parallel else self.in_features
        if x.shape[-1] != want:
            what = "this rank's slice" if self.input_is_parallel else "the full input"
            raise ValueError(f"RowParallelLinear: input must be [..., {want}] ({what}), got {tuple(x.shape)}")
        if not self.input_is_parallel:
            x = x[..., self.col_start : self.col_start + self.in_per_rank]
        return self.reduce(self._local(x))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's partial sums [..., out] -> the layer's output: summed over the ranks,
        then the bias added once."""
        y = partial.contiguous()
        if self.world > 1:
            ring.all_reduce(y, "sum", self.group)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_per_rank} on rank {self.rank} of {self.world}), "
                f"out_features={self.out_features}, quant={self.quant}")  # fmt: skip


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, group=None,
                 dtype=None, device=None):  # fmt: skip
        super().__init__()
        self.group = group
        self.rank, self.world = group_rank_world(group)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.per_rank = -(-num_embeddings // self.world)  # rows per rank, the vocab padded to tp * per_rank
        self.start, self.end = vocab_range(num_embeddings, self.world, self.rank)  # real rows (may be none)
        self.weight = torch.nn.Parameter(torch.zeros(self.per_rank, embedding_dim, device=device, dtype=dtype),
                                         requires_grad=False)  # fmt: skip

    @classmethod
    def from_embedding(cls, embedding: torch.nn.Embedding, group=None):
        if not isinstance(embedding, torch.nn.Embedding):
            raise TypeError(f"from_embedding: embedding must be a torch.nn.Embedding, got {type(embedding).__name__}")
        w = embedding.weight.detach()
        new = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, group, w.dtype, w.device)
        new.weight.data[: new.end - new.start].copy_(w[new.start : new.end])
        return new

    def shard_slices(self) -> dict[str, tuple[int, int, int]]:
        return {"weight": (0, self.start, self.end)}  # rows past end (padding) stay zero

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"VocabParallelEmbedding: ids must be int32 or int64, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"VocabParallelEmbedding: ids must be in [0, {self.num_embeddings}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")  # fmt: skip
        reduce = (lambda t: ring.all_reduce(t, "sum", self.group)) if self.world > 1 else None
        table = self.weight[: self.end - self.start]  # the padding rows past end are never read
        lookup = VocabEmbedding(self.start, self.end, self.weight.dtype, table=table)  # the runtime's layer
        return lookup(ids.reshape(-1), reduce).view(*ids.shape, self.embedding_dim)  # [..., D]

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}: rows [{self.start}, {self.end}) on rank {self.rank} "
                f"of {self.world}")  # fmt: skip


class ParallelLMHead(torch.nn.Module):
    """logits = h @ E^T over a vocab-sharded E [V, D] (``tie_to``: share a
    VocabParallelEmbedding's shard)."""

    def __init__(self, embedding_dim: int, num_embeddings: int, bias: bool = False, group=None, dtype=None,
                 device=None, tie_to: VocabParallelEmbedding | None = None):  # fmt: skip
        super().__init__()
        if bias:
            raise ValueError("ParallelLMHead: bias is not supported (Llama-family heads have none)")
        self.group = group
        self.rank, self.world = group_rank_world(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_rank = -(-num_embeddings // self.world)
        self.start, self.end = vocab_range(num_embeddings, self.world, self.rank)  # real rows (may be none)
        if tie_to is not None:
            if (tie_to.num_embeddings, tie_to.embedding_dim) != (num_embeddings, embedding_dim):
                raise ValueError("ParallelLMHead: tie_to has another vocab or width")
            self.weight = tie_to.weight  # the same Parameter
        else:
            self.weight = torch.nn.Parameter(torch.zeros(self.per_rank, embedding_dim, device=device, dtype=dtype),
                                             requires_grad=False)  # fmt: skip

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group=None):
        if not isinstance(linear, torch.nn.Linear) or linear.bias is not None:
            raise TypeError("ParallelLMHead.from_linear: linear must be a torch.nn.Linear without bias")
        w = linear.weight.detach()  # [V, D]
        new = cls(linear.in_features, linear.out_features, group=group, dtype=w.dtype, device=w.device)
        new.weight.data[: new.end - new.start].copy_(w[new.start : new.end])
        return new

    def shard_slices(self) -> dict[str, tuple[int, int, int]]:
        return {"weight": (0, self.start, self.end)}

    def _lm_head(self) -> LMHead:
        """The runtime's ``layers.LMHead`` over this rank's weight, padding rows included (their
        zero logits are past the vocab and cut off after the gather); made again when the
        weight's storage changes (a load writes it in place, which the layer sees)."""
        key = (self.weight.data_ptr(), tuple(self.weight.shape), self.weight.dtype)
        if getattr(self, "_head_key", None) != key:
            linear = Linear(self.weight.detach(), None, "none", self.weight.dtype)
            self._head, self._head_key = LMHead(linear, self.per_rank * self.world, self.world), key
        return self._head

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., per_rank]: this rank's vocab range; padding columns are -inf."""
        logits = self._lm_head().linear(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], self.per_rank)
        if self.end - self.start < self.per_rank:
            logits[..., self.end - self.start :] = float("-inf")
        return logits

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits [..., V] on every rank, in the weight's dtype."""
        if h.shape[-1] != self.embedding_dim:
            raise ValueError(f"ParallelLMHead: input must be [..., {self.embedding_dim}], got {tuple(h.shape)}")
        gather = (lambda flat: ring.all_gather(flat, self.group)) if self.world > 1 else None
        logits = self._lm_head()(h.reshape(-1, h.shape[-1]), gather)  # [T, per_rank * world] fp32
        return logits[:, : self.num_embeddings].to(self.weight.dtype).view(*h.shape[:-1], self.num_embeddings)

    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """argmax over the vocab without gathering the logits (greedy decoding): [...] int64,
        the lowest id among equal maxima, as torch.argmax."""
        best, idx = self.local_logits(h).float().max(-1)  # [...], first maximum of this shard
        idx = idx + self.start
        if self.world == 1:
            return idx
        values = ring.all_gather(best.contiguous(), self.group).view(self.world, *best.shape)
        ids = ring.all_gather(idx.contiguous(), self.group).view(self.world, *idx.shape)
        winner = values.argmax(0, keepdim=True)  # first (lowest-rank, so lowest-id) maximum
        return ids.gather(0, winner).squeeze(0)


class ParallelGatedMLP(torch.nn.Module):
    """Llama's MLP, down(act(gate(x)) * up(x)), with gate and up fused into one
    column-parallel GEMM (this rank's gate rows, then its up rows: [2 * ffn / tp, hidden])
    and down row-parallel: one input read and one all-reduce per call. SiLU and tanh-GELU
    run as the runtime's ``layers.GatedMLP`` runs them (``ops.silu_mul`` /
    ``ops.gelu_tanh_mul``, one pass over gate_up's output); any other act_fn through torch."""

    def __init__(self, gate_up: ColumnParallelLinear, down: RowParallelLinear, act_fn):
        super().__init__()
        self.gate_up, self.down, self.act_fn = gate_up, down, act_fn
        activation = _fused_activation(act_fn)
        # the runtime's layer on this rank's shards (their Linears, made again after a load)
        self._mlp = None if activation is None else GatedMLP(gate_up._local, down._local, activation)

    @classmethod
    def from_linears(cls, gate: torch.nn.Linear, up: torch.nn.Linear, down: torch.nn.Linear, act_fn=F.silu,
                     group=None, quant=None):  # fmt: skip
        if gate.weight.shape != up.weight.shape or (gate.bias is None) != (up.bias is None):
            raise ValueError("ParallelGatedMLP: gate and up projections must have the same shape")
        rank, world = group_rank_world(group)
        f0, f1 = even_range(gate.out_features, world, rank, "ffn size")  # the runtime's FFN split
        n, rows = f1 - f0, slice(f0, f1)
        fused = torch.nn.Linear(gate.in_features, 2 * n, gate.bias is not None, dtype=gate.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([gate.weight[rows], up.weight[rows]]))
            if gate.bias is not None:
                fused.bias.copy_(torch.cat([gate.bias[rows], up.bias[rows]]))
        gate_up = ColumnParallelLinear(gate.in_features, 2 * n, gate.bias is not None, group=group,
                                       dtype=gate.weight.dtype, quant=quant, out_per_rank=2 * n)  # fmt: skip
        gate_up._load_shard(fused.weight.detach(), fused.bias.detach() if fused.bias is not None else None)
        return cls(gate_up, RowParallelLinear.from_linear(down, group, quant=quant), act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mlp is not None:
            if x.shape[-1] != self.gate_up.in_features:
                raise ValueError(f"ParallelGatedMLP: input must be [..., {self.gate_up.in_features}], got "
                                 f"{tuple(x.shape)}")  # fmt: skip
            partial = self._mlp(x.reshape(-1, x.shape[-1]))  # [T, hidden]: this rank's partial sum
            return self.down.reduce(partial.view(*x.shape[:-1], partial.shape[-1]))
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [..., ffn / tp] each
        return self.down(self.act_fn(gate) * up)


def _fused_activation(act_fn) -> str | None:
    """The ``layers.GatedMLP`` activation ("silu" / "gelu_tanh") that act_fn is (HF's "silu"
    and "gelu_pytorch_tanh" modules included), else None (run through torch)."""
    if act_fn is F.silu or isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return "silu"
    if (isinstance(act_fn, torch.nn.GELU) and act_fn.approximate == "tanh") or \
            type(act_fn).__name__ in ("PytorchGELUTanh", "GELUTanh"):  # fmt: skip
        return "gelu_tanh"
    return None


# ---------------------------------------------------------------------------------------
# Loading only this rank's slices


def _shard_map(model) -> dict[str, tuple[int, int, int]]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "shard_slices"):
            for pname, where in module.shard_slices().items():
                out[f"{name}.{pname}" if name else pname] = where
    return out


def _load_into(model, fetch, source: str) -> None:
    """Copy every tensor of model.state_dict() from ``fetch(key, dim, start, stop)``
    (dim None: the whole tensor; returns None if the key is absent)."""
    shards = _shard_map(model)
    loaded: set[int] = set()
    missing = []
    for key, dst in model.state_dict(keep_vars=True).items():
        where = shards.get(key)
        dim, start, stop = where if where is not None else (None, 0, 0)
        src = fetch(key, dim, start, stop)
        if src is None:
            missing.append((key, dst))
            continue
        target = dst if where is None else dst.narrow(dim, 0, stop - start)
        if tuple(src.shape) != tuple(target.shape):
            raise ValueError(f"{source}: {key!r} has shape {tuple(src.shape)} but this rank's shard needs "
                             f"{tuple(target.shape)}")  # fmt: skip
        with torch.no_grad():  # in place, on the tensor itself: its version moves, prepared kernels re-check
            target.copy_(src)
        loaded.add(dst.data_ptr())
    for key, dst in missing:  # fine only for a tied tensor loaded under another name
        if dst.data_ptr() not in loaded:
            raise ValueError(f"{source}: no tensor {key!r} for this model")
    for module in model.modules():  # int8 packings are made again from the new weights
        if isinstance(module, _ShardedLinear):
            module._linear = None


def load_state_dict_shard(model: torch.nn.Module, full_state_dict: dict) -> None:
    """Load a full (unsharded) state_dict into a parallelized model: each parallel layer
    takes its rows / columns, everything else is copied whole."""

    def fetch(key, dim, start, stop):
        t = full_state_dict.get(key)
        return t if t is None or dim is None else t.narrow(dim, start, stop - start)

    _load_into(model, fetch, "load_state_dict_shard")


def load_safetensors_shard(model: torch.nn.Module, paths) -> None:
    """Like load_state_dict_shard, from safetensors files, reading only this rank's
    slices of the parallel layers' tensors from disk (safetensors' get_slice)."""
    from safetensors import safe_open

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    handles = [safe_open(str(p), framework="pt") for p in paths]
    where = {k: h for h in handles for k in h.keys()}

    def fetch(key, dim, start, stop):
        h = where.get(key)
        if h is None:
            return None
        if dim is None:
            return h.get_tensor(key)
        sl = h.get_slice(key)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    _load_into(model, fetch, "load_safetensors_shard")


# ---------------------------------------------------------------------------------------
# HF Llama-family models


def parallelize(model: torch.nn.Module, group=None, quant: str | None = None, fuse_mlp: bool = False) -> dict[str, int]:
    """Shard an HF Llama-family model (Llama, Mistral, Qwen2, SmolLM2...) in place over the
    ranks of ``group``: attention heads (q/k/v column-parallel, o row-parallel; heads split as
    the runtime splits them, ``layers.sharding.head_split``: whole GQA groups, as evenly as
    they go, so SmolLM2's 3 KV heads run on 2 ranks), MLP
    (gate/up column-parallel, down row-parallel), the embedding (vocab-parallel) and the LM
    head (vocab-parallel, logits gathered; tied weights stay tied). Every rank must hold
    the same full model before the call; afterwards ``model(input_ids)`` returns the full
    logits on every rank. ``fuse_mlp=True`` replaces each MLP by a ``ParallelGatedMLP``
    (gate and up in one GEMM; the state_dict keys then differ from HF's). Returns {what: count}."""
    rank, world = group_rank_world(group)
    counts = {"attention": 0, "mlp": 0, "embedding": 0, "lm_head": 0}
    mlps = []
    for module in list(model.modules()):
        if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            d = module.head_dim
            heads, kv_heads = module.q_proj.out_features // d, module.k_proj.out_features // d
            (q0, q1), (k0, k1) = head_split(heads, kv_heads, world, rank)  # the runtime's split
            module.q_proj = ColumnParallelLinear.from_linear(module.q_proj, group, quant=quant, rows=(q0 * d, q1 * d))
            module.k_proj = ColumnParallelLinear.from_linear(module.k_proj, group, quant=quant, rows=(k0 * d, k1 * d))
            module.v_proj = ColumnParallelLinear.from_linear(module.v_proj, group, quant=quant, rows=(k0 * d, k1 * d))
            module.o_proj = RowParallelLinear.from_linear(module.o_proj, group, quant=quant, cols=(q0 * d, q1 * d))
            module.num_key_value_groups = (q1 - q0) // (k1 - k0)
            counts["attention"] += 1
        elif all(isinstance(getattr(module, a, None), torch.nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            if fuse_mlp:
                mlps.append(module)
            else:
                module.gate_proj = ColumnParallelLinear.from_linear(module.gate_proj, group, quant=quant)
                module.up_proj = ColumnParallelLinear.from_linear(module.up_proj, group, quant=quant)
                module.down_proj = RowParallelLinear.from_linear(module.down_proj, group, quant=quant)
            counts["mlp"] += 1
    if mlps:  # swap each MLP module for the fused one in its parent
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if any(child is m for m in mlps):
                    setattr(parent, child_name, ParallelGatedMLP.from_linears(
                        child.gate_proj, child.up_proj, child.down_proj, child.act_fn, group, quant))
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(embed, torch.nn.Embedding) and isinstance(head, torch.nn.Linear) and head.weight is embed.weight
    if isinstance(embed, torch.nn.Embedding):
        embed = VocabParallelEmbedding.from_embedding(embed, group)
        model.set_input_embeddings(embed)
        counts["embedding"] = 1
    if isinstance(head, torch.nn.Linear):
        if tied:
            new_head = ParallelLMHead(head.in_features, head.out_features, group=group, tie_to=embed)
        else:
            new_head = ParallelLMHead.from_linear(head, group)
        model.set_output_embeddings(new_head)
        counts["lm_head"] = 1
    return counts
