"""What a request's new tokens become for its caller: detokenized text (incremental, a
character split over tokens held back), stop strings (the text cut where one appears; a
tail that may still grow into one held back), the finish reason, and at the end the
``GenerationResult``."""

from __future__ import annotations

import dataclasses

import torch

from .sampling import TokenLogprobs
from .scheduler import Request


@dataclasses.dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # the new tokens
    text: str  # their text (a matched stop string and what follows cut off)
    finish_reason: str  # "eos" | "stop" | "length"
    prefill_s: float  # time from the request's admission to its first token
    decode_s: float  # time from its first token to its last
    cached_tokens: int = 0  # prompt tokens whose k/v came from the prefix cache (not computed)
    logprobs: list[TokenLogprobs] | None = None  # per new token, when the request asked (logprobs=k)

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


@dataclasses.dataclass
class TokenEvent:
    """One new token of request ``index`` (its position in the prompts given)."""

    index: int
    token_id: int
    text: str  # the new text this token completes (may be "" mid-character or near a stop string)
    finished: bool
    result: GenerationResult | None = None  # set on the request's last event
    logprobs: TokenLogprobs | None = None  # this token's, when the request asked (logprobs=k)


class OutputProcessor:
    def __init__(self, eos_ids: set[int], max_model_len: int):
        self.eos_ids, self.max_model_len = eos_ids, max_model_len

    def accept(self, r: Request, token: int, logprobs: TokenLogprobs | None, now: float) -> TokenEvent:
        """Append the sampled token to r; sets r.finish_reason when it ends the request."""
        if not r.out_ids:
            r.t_first = now
        r.t_last = now
        r.out_ids.append(token)
        if r.logprobs is not None:
            r.logprobs.append(logprobs)
        if r.seen is not None:
            r.seen = torch.cat([r.seen, torch.tensor([token])])
        p = r.params
        if token in self.eos_ids and not p.ignore_eos:
            r.finish_reason = "eos"
        else:
            r.text += r.decoder.push(token)
        if r.finish_reason is None and p.stop:
            start = max(0, r.emitted - max(map(len, p.stop)))
            hits = [i for i in (r.text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                r.text, r.finish_reason = r.text[: min(hits)], "stop"
        if r.finish_reason is None and (len(r.out_ids) >= p.max_new_tokens or r.length >= self.max_model_len):
            r.finish_reason = "length"
        finished = r.finish_reason is not None
        if finished:
            if r.finish_reason != "stop":
                r.text += r.decoder.flush()
            limit = len(r.text)
        else:  # hold back a tail that may still grow into a stop string
            limit = len(r.text) - (max(map(len, p.stop)) - 1 if p.stop else 0)
        delta = r.text[r.emitted : max(limit, r.emitted)]
        r.emitted = max(limit, r.emitted)
        result = None
        if finished:
            result = GenerationResult(r.prompt_ids, r.out_ids, r.text, r.finish_reason, r.t_first - r.t_admit,
                                      r.t_last - r.t_first, r.cached, r.logprobs)  # fmt: skip
        return TokenEvent(r.index, token, delta, finished, result, logprobs)
