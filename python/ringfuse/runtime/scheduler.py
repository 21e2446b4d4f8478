"""Continuous batching over the paged KV cache: which requests the next step runs.

Each step first admits waiting requests (up to ``max_batch`` running, each reserving the
cache blocks for its prompt plus its ``max_new_tokens``, so nothing is ever preempted) and
prefills them together; otherwise it decodes one token for every running request.
Finished requests leave at once and free their blocks; new ones join between decode steps.
Prompt blocks stay cached after their request (kv_blocks.BlockPool): a prompt that starts
with the same tokens maps them and prefills only the rest.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from .kv_blocks import BlockPool
from .sampling import SamplingParams, TokenLogprobs, generator


class Request:
    """One prompt's state from queueing to its last token."""

    def __init__(self, index, prompt_ids, params: SamplingParams, decoder, seed: int, device: torch.device | str = "cpu"):
        self.index, self.prompt_ids, self.params, self.decoder = index, prompt_ids, params, decoder
        self.out_ids: list[int] = []
        self.blocks: list[int] = []
        self.cached = 0  # leading prompt tokens already in the cache (prefix reuse)
        self.text, self.emitted = "", 0  # all decoded text; how much of it was handed out
        self.finish_reason: str | None = None
        self.generator = None
        if not params.greedy:
            # on the device that samples: the CUDA runner draws on the GPU (select_on_device)
            self.generator = generator(params.seed if params.seed is not None else seed, device)
        self.seen = torch.tensor(prompt_ids, dtype=torch.int64) if params.repetition_penalty != 1.0 else None
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.t_admit = self.t_first = self.t_last = 0.0

    @property
    def length(self) -> int:  # tokens with a place in the cache (the last sampled one not yet)
        return len(self.prompt_ids) + len(self.out_ids)


class Scheduler:
    """The waiting queue, the running batch and the KV block accounting."""

    def __init__(self, blocks: BlockPool, max_batch: int, max_model_len: int):
        self.blocks, self.max_batch, self.max_model_len = blocks, max_batch, max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.new: list[Request] = []  # admitted, not yet prefilled (also in running)
        # prompt tokens looked up in the prefix cache at admission, and those found there
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    def blocks_needed(self, prompt_len: int, params: SamplingParams) -> int:
        tokens = min(prompt_len + params.max_new_tokens, self.max_model_len)
        return -(-tokens // self.blocks.block_size)

    def check_length(self, prompt_len: int) -> None:
        """ValueError unless the prompt leaves room for at least one new token in the context."""
        if not 1 <= prompt_len < self.max_model_len:
            raise ValueError(f"the prompt has {prompt_len} tokens but the context is {self.max_model_len} "
                             "(max_model_len): at least one new token must fit")  # fmt: skip

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """ValueError if such a request could never be admitted (no room for a new token in
        the context, or more cache blocks than the cache has)."""
        self.check_length(prompt_len)
        need = self.blocks_needed(prompt_len, params)
        if need > self.blocks.num_blocks:
            size = self.blocks.block_size
            raise ValueError(f"the request needs {need * size} cache tokens but the cache holds "
                             f"{self.blocks.num_blocks * size} (raise kv_cache_tokens)")  # fmt: skip

    def add(self, r: Request) -> None:
        self.check(len(r.prompt_ids), r.params)
        self.waiting.append(r)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.new)

    def schedule(self) -> tuple[str, list[Request]] | None:
        """("prefill", the newly admitted) or ("decode", the running batch) or None (idle)."""
        self._admit()
        if self.new:
            new, self.new = self.new, []
            return "prefill", new
        return ("decode", self.running) if self.running else None

    def finish_step(self) -> None:
        """Finished requests leave the batch and free their blocks."""
        for r in self.running:
            if r.finish_reason is not None:
                self.release(r)
        self.running = [r for r in self.running if r.finish_reason is None]

    def abort(self, index: int) -> bool:
        for r in self.waiting:
            if r.index == index:
                self.waiting.remove(r)
                return True
        for r in self.running:  # admitted requests are in running (and in new until prefilled)
            if r.index == index:
                self.release(r)
                self.running.remove(r)
                if r in self.new:
                    self.new.remove(r)
                return True
        return False

    def requeue(self, reqs: list[Request]) -> None:
        """Requests admitted for a prefill that did not complete (an exception in the step):
        back to the front of the queue in their order, their blocks freed (their KV was not
        registered in the prefix cache, or was complete when it was)."""
        for r in reversed(reqs):
            if r in self.running:
                self.running.remove(r)
            if r in self.new:
                self.new.remove(r)
            self.release(r)
            self.prefix_cache_queries -= len(r.prompt_ids)  # counted again when it is admitted again
            self.prefix_cache_hits -= r.cached
            r.cached = 0
            self.waiting.appendleft(r)

    def abort_all(self) -> None:
        for r in self.running:  # admitted requests (new ones too) are in running
            self.release(r)
        self.waiting.clear()
        self.running, self.new = [], []

    def release(self, r: Request) -> None:
        self.blocks.release(r.blocks)
        r.blocks = []

    def usage(self) -> float:
        """Fraction of the KV cache's blocks held by requests (cached prefix blocks nobody
        holds count as free: they are evicted on demand)."""
        return 1.0 - self.blocks.available() / self.blocks.num_blocks

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:  # new requests are in running too
            r = self.waiting[0]
            got = self.blocks.allocate(r.prompt_ids, self.blocks_needed(len(r.prompt_ids), r.params))
            if got is None:
                break  # first come, first served: wait for blocks to free up
            self.waiting.popleft()
            r.blocks, r.cached = got
            self.prefix_cache_queries += len(r.prompt_ids)
            self.prefix_cache_hits += r.cached
            r.t_admit = time.perf_counter()
            self.new.append(r)
            self.running.append(r)
