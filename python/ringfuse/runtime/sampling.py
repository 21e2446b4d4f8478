"""Sampling parameters and next-token selection, in HF transformers' order: repetition
penalty, temperature, top-k, top-p, then a draw from each request's own generator (so a
seed gives the same tokens whatever else shares the batch). temperature 0 (or below
GREEDY_BELOW) is greedy. Any finite positive temperature or penalty is safe: the logits are
shifted so the largest is 0 before the temperature divides them, and a penalized logit past
fp32's range saturates, so no inf - inf or inf / inf can make a NaN.

Two selectors with the same filters: ``select`` (the CPU runner's: a loop over the rows,
``torch.multinomial`` per sampled row) and ``select_on_device`` (the CUDA runner's: the
whole batch in tensor ops on the logits' device, a draw per sampled row by the exponential
race, no host sync). A seed is reproducible within each; the two draw differently, so the
same seed gives different tokens on the CPU and on a GPU."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

GREEDY_BELOW = 1e-5  # a temperature this small is argmax for every practical purpose
SEED_LIMIT = 1 << 64  # seeds are torch's: a uint64
_FP32_MAX = torch.finfo(torch.float32).max


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the sequence
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends where one of these strings appears (not included)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: each new token's log-probability and the k likeliest

    def __post_init__(self):
        def number(name, lo, lo_open=False, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise TypeError(f"{name} must be a finite number, got {v!r}")
            if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
                rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
                raise ValueError(f"{name} must be in {rng}, got {v!r}")

        for name in ("max_new_tokens", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        number("temperature", 0.0)
        number("top_p", 0.0, lo_open=True, hi=1.0)
        number("repetition_penalty", 0.0, lo_open=True)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)):
            raise TypeError(f"logprobs must be an int or None, got {type(self.logprobs).__name__}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (the number of alternatives to report), got {self.logprobs}")
        try:
            stop = (self.stop,) if isinstance(self.stop, str) else () if self.stop is None else tuple(self.stop)
        except TypeError:  # not iterable (3, True...)
            stop = (self.stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise TypeError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if isinstance(self.stop, (set, frozenset)):  # a set's order differs between processes: sort it
            stop = tuple(sorted(stop))
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability and the likeliest tokens at its position."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), likeliest first


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` in [0, 2**64). torch reads a seed >=
    2**63 as seed - 2**64 (the same uint64 bits), and some versions accept only that form."""
    return torch.Generator(device=device).manual_seed(seed - SEED_LIMIT if seed >= SEED_LIMIT >> 1 else seed)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place on one row [V]: the logits of ids in ``seen`` (int64) are divided by the
    penalty when positive and multiplied when negative (CTRL / HF). Results past fp32's range
    (a tiny or huge penalty) saturate at +-fp32 max instead of becoming inf."""
    scores = logits[seen]
    logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty).clamp(-_FP32_MAX, _FP32_MAX)


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Row [V] fp32 of penalized logits -> the sampling distribution after temperature,
    top-k and top-p (at least one token always kept)."""
    # shifted first: every value <= 0 before dividing, so a tiny temperature gives -inf
    # (probability 0) where the unshifted quotient would overflow to inf and make NaNs
    logits = (logits - logits.max()) / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[-1] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits.softmax(-1)


def select(logits: torch.Tensor, params: list[SamplingParams], seen: list, generators: list) -> list[int]:
    """Next token per row of logits [R, V] fp32. ``seen[r]``: int64 ids for the repetition
    penalty (or None); ``generators[r]``: that request's torch.Generator."""
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        # the common case: one argmax for the whole batch; numpy's (SIMD) takes ~3 us for a
        # 49152-wide row where torch's takes ~30, with the same result (first maximum; NaN wins)
        fast = logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64)
        return (logits.detach().numpy() if fast else logits).argmax(-1).tolist()
    out = []
    for r, p in enumerate(params):
        row = logits[r].clone()
        if p.repetition_penalty != 1.0 and seen[r] is not None and seen[r].numel():
            apply_repetition_penalty(row, seen[r], p.repetition_penalty)
        if p.greedy:
            out.append(int(row.argmax()))
        else:
            out.append(int(torch.multinomial(filtered_probs(row, p), 1, generator=generators[r])))
    return out


def select_on_device(logits: torch.Tensor, params: list[SamplingParams], seen: list, generators: list) -> torch.Tensor:
    """``select`` for the whole batch in tensor ops on the logits' device: [R] int64 token
    ids there, computed without reading anything back (the caller's ``.tolist()`` is the one
    sync). ``seen[r]``: int64 ids on the CPU (or None; they are padded there and copied
    over, as ``Request.seen`` keeps them); ``generators[r]``: a
    torch.Generator on the logits' device for each sampled row.

    Greedy rows (and every row's repetition penalty) give what ``select`` gives: the same
    fp32 operations per element. A sampled row draws by the exponential race: with q_i
    i.i.d. Exp(1) from the row's generator, argmax_i p_i / q_i is token i with probability
    p_i (FlashInfer's and vLLM's sampler), one draw of V exponentials per row."""
    dev = logits.device
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        return logits.argmax(-1)
    logits = logits.float().clone()  # [R, V], penalized in place
    penalized = [r for r, p in enumerate(params)
                 if p.repetition_penalty != 1.0 and seen[r] is not None and seen[r].numel()]  # fmt: skip
    if penalized:
        _penalize_rows(logits, penalized, [seen[r] for r in penalized], [params[r].repetition_penalty for r in penalized])
    tokens = logits.argmax(-1)  # [R]: the greedy rows' answer
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, dtype=torch.int64).to(dev, non_blocking=True)
        probs = filtered_probs_rows(logits.index_select(0, index), [params[r] for r in sampled])  # [S, V]
        race = torch.empty_like(probs)
        for i, r in enumerate(sampled):
            race[i].exponential_(generator=generators[r])
        # a zero-probability token never wins, even against an Exp(1) draw of exactly 0
        score = torch.where(probs > 0, probs / race, torch.full_like(probs, -1.0))
        tokens.index_copy_(0, index, score.argmax(-1))
    return tokens


def _penalize_rows(logits: torch.Tensor, rows: list[int], seen: list, penalties: list[float]) -> None:
    """apply_repetition_penalty on logits [R, V] in place, for the given rows at once: their
    seen ids padded with each row's first id (a repeated id gets the same value again)."""
    dev = logits.device
    width = max(s.numel() for s in seen)
    ids = torch.stack([torch.cat([s, s[:1].expand(width - s.numel())]) for s in (t.reshape(-1) for t in seen)])
    ids = ids.to(dev, non_blocking=True)  # [P, width]
    index = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
    penalty = torch.tensor(penalties, dtype=torch.float32).to(dev, non_blocking=True)[:, None]  # [P, 1]
    part = logits.index_select(0, index)  # [P, V]
    scores = part.gather(1, ids)
    part.scatter_(1, ids, torch.where(scores < 0, scores * penalty, scores / penalty).clamp(-_FP32_MAX, _FP32_MAX))
    logits.index_copy_(0, index, part)


def filtered_probs_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``filtered_probs`` for every row of logits [R, V] fp32 at once, each with its own
    temperature, top-k and top-p (a sort of the batch only when some row asks for top-p)."""
    vocab, dev = logits.shape[-1], logits.device

    def column(values, dtype=torch.float32):  # [R, 1] on the device, without a sync
        return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)[:, None]

    logits = (logits - logits.amax(-1, keepdim=True)) / column([p.temperature for p in params])
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        k = column(top_k, torch.int64)
        kth = logits.topk(max(top_k), -1).values.gather(1, (k - 1).clamp(min=0))  # [R, 1]
        kth = torch.where(k > 0, kth, torch.full_like(kth, float("-inf")))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        sorted_logits, order = torch.sort(logits, -1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= column([1 - p.top_p if p.top_p < 1.0 else -1.0 for p in params])  # -1: the row keeps all
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.softmax(-1)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list) -> list[TokenLogprobs | None]:
    """Per row of logits [R, V] fp32 whose ``top[r]`` is an int: the log-probability of
    ``tokens[r]`` and the ``top[r]`` likeliest tokens with theirs; None for rows with
    ``top[r]`` None (only the rows that ask pay for the log-softmax). The distribution is the
    model's own (log-softmax of the raw logits, before penalty, temperature, top-k and top-p),
    as vLLM reports by default: it says how likely the model found a token, whatever the
    sampling settings did with it."""
    out: list[TokenLogprobs | None] = [None] * len(top)
    rows = [r for r, k in enumerate(top) if k is not None]
    if not rows:
        return out
    logp = logits[rows].log_softmax(-1)  # [R', V]
    chosen = logp[torch.arange(len(rows), device=logp.device),
                  torch.tensor([tokens[r] for r in rows], device=logp.device)].tolist()  # fmt: skip
    k = min(max(top[r] for r in rows), logp.shape[-1])
    values, ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    for i, r in enumerate(rows):
        out[r] = TokenLogprobs(chosen[i], tuple(zip(ids[i][: top[r]], values[i][: top[r]])))
    return out
