"""Tensor-parallel bench: a Llama MLP block and a Llama decoder layer (HF's, when
transformers is installed) at tp = 2 (two processes on this host, one thread each, the shm
ring between them) vs tp = 1 (this process, two threads), fp32, measured in the same run:
tp = 1 is timed before and after the tp = 2 processes run and the median of both is used.
"comm" is the time of the layer's all-reduces alone (same sizes, same ring), as a share of
the tp = 2 step.
"""

from __future__ import annotations

import statistics
import time

import torch

from .harness import fmt_us, print_table, run_ranks
from .limits import cpu_path

MLP_SIZES = [(576, 1536), (4096, 11008)]  # (hidden, ffn): SmolLM2-135M, Llama-2-7B
TOKENS = [(1, 1), (8, 128)]  # (batch, seq)


class Mlp(torch.nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, ffn, bias=False)
        self.up_proj = torch.nn.Linear(hidden, ffn, bias=False)
        self.down_proj = torch.nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _heads(hidden):
    """(heads, kv heads) of the decoder layer: Llama-2-7B's 32 / 32 at 4096; at 576 12 / 4
    of 48 dims (SmolLM2's own 9 / 3 heads would split unevenly over tp = 2, 1 + 2 GQA
    groups: the even 12 / 4 keeps the ranks' work equal, which the bench compares)."""
    return (12, 4) if hidden == 576 else (hidden // 128, hidden // 128)


def _decoder_layer(hidden, ffn):
    """(HF LlamaDecoderLayer, rotary embedding) or None without transformers."""
    try:
        import transformers
        from transformers.models.llama import modeling_llama as ml
    except ImportError:
        return None
    heads, kv_heads = _heads(hidden)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, head_dim=hidden // heads,
                                   max_position_embeddings=256)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return ml.LlamaDecoderLayer(cfg, 0).eval(), ml.LlamaRotaryEmbedding(cfg)


def _cases(quick):
    cases = []
    for hidden, ffn in MLP_SIZES[:1] if quick else MLP_SIZES:
        for b, s in TOKENS:
            cases.append(("mlp", hidden, ffn, b, s))
            cases.append(("decoder", hidden, ffn, b, s))
    return cases


def valid_nproc(quick: bool = False) -> list[int]:
    """The tp sizes (2 to 64) every case of the bench splits into: ffn rows, attention heads."""
    from ..layers.sharding import head_split

    def fits(tp, hidden, ffn):
        try:
            head_split(*_heads(hidden), tp, 0)
        except ValueError:
            return False
        return ffn % tp == 0

    return [tp for tp in range(2, 65) if all(fits(tp, h, f) for _, h, f, _, _ in _cases(quick))]


def check_nproc(nproc: int, quick: bool = False) -> None:
    if nproc < 2:
        raise ValueError(f"bench tp: --nproc must be >= 2 (tp = 1 is the baseline, timed in this process), "
                         f"got {nproc}")  # fmt: skip
    valid = valid_nproc(quick)
    if nproc not in valid:
        raise ValueError(f"bench tp: --nproc {nproc} does not fit the bench's layers (tp = --nproc processes; "
                         f"valid: {', '.join(map(str, valid))})")  # fmt: skip


def _build(kind, hidden, ffn):
    torch.manual_seed(0)
    if kind == "mlp":
        return Mlp(hidden, ffn).eval(), None
    built = _decoder_layer(hidden, ffn)
    return built if built is not None else (None, None)


def _call(kind, module, rotary, x):
    if kind == "mlp":
        return module(x)
    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return module(x, position_embeddings=rotary(x, pos))


def _time(fn, rounds, barrier=None):
    fn()
    times = []
    for _ in range(rounds):
        if barrier:
            barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tp1(cases, rounds):
    torch.set_num_threads(2)
    out = []
    with torch.no_grad():
        for kind, hidden, ffn, b, s in cases:
            module, rotary = _build(kind, hidden, ffn)
            x = torch.randn(b, s, hidden)
            out.append(_time(lambda: _call(kind, module, rotary, x), rounds) if module is not None else None)
    return out


def _rank_body(rank, world, cases, rounds):
    import torch.distributed as dist

    from .. import distributed as rd

    rows = []
    with torch.no_grad():
        for kind, hidden, ffn, b, s in cases:
            module, rotary = _build(kind, hidden, ffn)
            if module is None:
                rows.append(None)
                continue
            rd.parallelize(module)
            x = torch.randn(b, s, hidden)
            step = _time(lambda: _call(kind, module, rotary, x), rounds, dist.barrier)
            reduces = 1 if kind == "mlp" else 2  # MLP: down; decoder: o_proj and down
            y = torch.randn(b, s, hidden)
            comm = reduces * _time(lambda: rd.all_reduce(y), rounds, dist.barrier)
            rows.append((step, comm))
    return rows


def run(nproc: int = 2, rounds: int = 7, quick: bool = False):
    check_nproc(nproc, quick)
    cases = _cases(quick)
    before = _tp1(cases, rounds)
    rows = run_ranks(_rank_body, nproc, cases, rounds)
    after = _tp1(cases, rounds)
    table, results = [], []
    for (kind, hidden, ffn, b, s), t_a, t_b, row in zip(cases, before, after, rows):
        if row is None or t_a is None:
            continue
        tp1 = statistics.median([t_a, t_b])
        step, comm = row
        results.append(dict(kind=kind, hidden=hidden, ffn=ffn, batch=b, seq=s, tp1_s=tp1, tp2_s=step, comm_s=comm,
                            speedup=tp1 / step, comm_share=comm / step))  # fmt: skip
        table.append([kind, f"{hidden} / {ffn}", f"{b} x {s}", fmt_us(tp1), fmt_us(step), fmt_us(comm),
                      f"{100 * comm / step:.0f}%", f"{tp1 / step:.2f}x"])  # fmt: skip
    print_table(f"tensor parallel, fp32: tp = {nproc} ({nproc} processes x 1 thread, shm ring) vs tp = 1 "
                f"(1 process x {nproc} threads), cpu path {cpu_path()}",
                ["block", "hidden / ffn", "batch x seq", "tp=1 us", f"tp={nproc} us", "comm us", "comm share",
                 f"tp={nproc} vs tp=1"], table, left=3,
                note="medians; tp = 1 timed before and after the tp processes; comm = the block's all-reduces "
                     "alone at the same size.")  # fmt: skip
    return results
