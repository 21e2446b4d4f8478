"""``ringfuse bench serve``: load test of ``ringfuse serve`` and llama.cpp's server under the
same load in the same run, driven by GuideLLM, plus the server targets of the serving issue.

What runs, one server at a time (2 cores: never one loaded while the other is measured):
1. offline: ``LLM.generate`` on the 8 prompts of ``bench generate`` (batch 8), and the
   prefill time of one prompt of --prompt-tokens random tokens (median of 3), in a process
   of its own with the server's engine settings.
2. ``ringfuse serve`` (--quant, default w8a16; --threads, default 2; --max-batch 16): a
   warm-up, the same 8 prompts sent at once (concurrency 8, median of 3 rounds), then
   GuideLLM at concurrency 1, 4 and 16.
3. ``ringfuse serve --max-waiting 4``: a burst of 16 requests at once (each must get 200 or
   429), then one request after it (must get 200).
4. llama.cpp's server (xllamacpp from the peers venv, via llama_server.py) on the same GGUF,
   the same threads, 16 slots: the same warm-up, 8-prompt round and GuideLLM load.

GuideLLM (PyPI ``guidellm``, in a venv of its own: $RINGFUSE_GUIDELLM or ``guidellm`` on
PATH) runs offline (HF_HUB_OFFLINE=1) with the model's own tokenizer, exported from the GGUF
once by transformers into ``$RINGFUSE_CACHE/tokenizers``: /v1/completions, streaming,
synthetic prompts of --prompt-tokens tokens, exactly --output-tokens new tokens
(``ignore_eos``), --requests requests per concurrency level, a fixed seed.

Metrics per engine and concurrency (p50 / p90 / p99):
- TTFT: request sent to first token (GuideLLM's time_to_first_token_ms).
- TPOT: vLLM's, per request (e2e - TTFT) / (n - 1), here (last token - first token) /
  (n - 1) from GuideLLM's per-request records, each request weighted once.
- ITL: GuideLLM's inter_token_latency_ms: the same per-request mean gap, weighted by the
  request's n - 1 gaps. GuideLLM keeps no per-token timestamps, so vLLM's pooled per-gap ITL
  is not available; with fixed output lengths ITL and TPOT are the same distribution.
- e2e: request latency (GuideLLM's request_latency); output tok/s: GuideLLM's output token
  throughput (output tokens / benchmark duration).

Results: two tables (load, targets), a JSON file and a PNG plot (latency percentiles and
throughput against concurrency, both engines); the servers' logs and GuideLLM's own JSON in
a folder beside them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .generate import BATCH_PROMPTS

CONCURRENCY = (1, 4, 16)  # GuideLLM's levels
OVERHEAD_CONCURRENCY = 8  # the server-overhead target: the 8 prompts at once
BURST_MAX_WAITING = 4  # --max-waiting of the burst server; the burst is 4x as many requests
BURST_TOKENS = 16  # new tokens per burst request
ROUNDS = 3  # timed rounds of the offline runs and of the 8-prompt server round (median)
DEFAULTS = dict(quant="w8a16", threads=2, requests=32, prompt_tokens=128, output_tokens=64)
QUICK = dict(requests=16, output_tokens=32)
MAX_TOKENS = 4096  # prompt + output: the context both servers get is twice that, times 16 slots
TARGETS = dict(overhead_ratio=0.90, ttft_extra_ms=10.0, vs_peer_tok_s=1.0, vs_peer_ttft=1.0, burst_429_p99_ms=50.0)

GUIDELLM_VENV = "/tmp/guidellm-venv"
GUIDELLM_INSTALL = (f"python3 -m venv {GUIDELLM_VENV} && {GUIDELLM_VENV}/bin/pip install guidellm torch==2.13.0 "
                    "transformers==5.25.0")  # fmt: skip
BENCH_EXTRA = "pip install 'ringfuse[serve,bench]'"
START_TIMEOUT_S = 600  # a server's start (the first w8a16 load converts the GGUF's weights)
REQUEST_TIMEOUT_S = 300  # one request of the bench's own client
GUIDELLM_TIMEOUT_S = 3600  # one engine's whole GuideLLM sweep
LISTENING = re.compile(r"listening on (https?://[^\s;]+)")
PERCENTILES = ("p50", "p90", "p99")
RINGFUSE, LLAMA = "ringfuse", "llama.cpp"


class BenchError(RuntimeError):
    """A stage of the bench failed; the message says which and why."""


@dataclasses.dataclass
class Settings:
    model: Path  # the GGUF both engines serve
    model_name: str  # the name clients pass as "model"
    quant: str
    threads: int
    requests: int  # GuideLLM requests per concurrency level
    prompt_tokens: int
    output_tokens: int

    @property
    def max_batch(self) -> int:  # both engines can batch every stream of the top level
        return max(CONCURRENCY)

    @property
    def max_model_len(self) -> int:  # room for a prompt + its output, twice over (tokenizers differ a little)
        return max(256, 2 * (self.prompt_tokens + self.output_tokens))


# ---- prerequisites --------------------------------------------------------------------------


def find_guidellm() -> Path:
    """The guidellm executable: $RINGFUSE_GUIDELLM, else ``guidellm`` on PATH. BenchError
    saying how to get it otherwise."""
    given = os.environ.get("RINGFUSE_GUIDELLM")
    if given:
        path = Path(given).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise BenchError(f"$RINGFUSE_GUIDELLM={given} is not an executable file; point it at the guidellm "
                         f"executable of a GuideLLM venv, created with:\n{GUIDELLM_INSTALL}")  # fmt: skip
    found = shutil.which("guidellm")
    if found:
        return Path(found)
    raise BenchError("GuideLLM is not installed: set $RINGFUSE_GUIDELLM to its guidellm executable or put guidellm "
                     f"on PATH. It lives in a venv of its own (~1.5 GB), created with:\n{GUIDELLM_INSTALL}\n"
                     f"then: RINGFUSE_GUIDELLM={GUIDELLM_VENV}/bin/guidellm ringfuse bench serve")  # fmt: skip


def missing_modules() -> list[str]:
    """What this bench needs in ringfuse's own environment and lacks (distribution names)."""
    from .. import serve

    need = {"matplotlib": "matplotlib", "transformers": "transformers"}  # the plot; the tokenizer export
    missing = list(serve.missing_dependencies())
    for module, dist in need.items():
        if importlib.util.find_spec(module) is None:
            missing.append(dist)
    return missing


def peer_python() -> Path | str:
    """The peers venv's Python with xllamacpp ($PEERS_VENV, default /tmp/peers-venv), or why
    llama.cpp cannot run."""
    venv = Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv"))
    python = venv / "bin" / "python"
    if not python.is_file():
        return f"no peers venv at {venv} (set $PEERS_VENV; ../shared/peers/setup.sh creates it with xllamacpp)"
    probe = subprocess.run([str(python), "-I", "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('xllamacpp') is None)"],
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip
    if probe.returncode != 0:
        return f"the peers venv {venv} has no xllamacpp (pip install xllamacpp there)"
    return python


def check_settings(requests: int | None = None, prompt_tokens: int | None = None, output_tokens: int | None = None,
                   threads: int | None = None) -> None:  # fmt: skip
    """ValueError naming the flag for a value the bench cannot use (None: the default)."""
    for flag, v, low in (("--requests", requests, 1), ("--prompt-tokens", prompt_tokens, 8),
                         ("--output-tokens", output_tokens, 2), ("--threads", threads, 1)):  # fmt: skip
        if v is not None and v < low:
            raise ValueError(f"{flag} must be >= {low} for the serve bench, got {v}")
    total = (prompt_tokens or DEFAULTS["prompt_tokens"]) + (output_tokens or DEFAULTS["output_tokens"])
    if total > MAX_TOKENS:
        raise ValueError(f"--prompt-tokens + --output-tokens must be <= {MAX_TOKENS}, got {total}")


def make_settings(model: Path, name: str, quant: str | None = None, threads: int | None = None,
                  requests: int | None = None, prompt_tokens: int | None = None, output_tokens: int | None = None,
                  quick: bool = False) -> Settings:  # fmt: skip
    """The run's settings: the values given, else --quick's, else the defaults; ValueError
    naming the flag for one the bench cannot use."""
    given = dict(quant=quant, threads=threads, requests=requests, prompt_tokens=prompt_tokens,
                 output_tokens=output_tokens)  # fmt: skip
    values = {k: v if v is not None else (QUICK if quick else {}).get(k, DEFAULTS[k]) for k, v in given.items()}
    check_settings(values["requests"], values["prompt_tokens"], values["output_tokens"], values["threads"])
    return Settings(model, name, **values)


# ---- the tokenizer GuideLLM counts with -----------------------------------------------------

_EXPORT = """
import sys
from transformers import AutoTokenizer
folder, name, out = sys.argv[1:4]
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
"""


def tokenizer_dir(gguf: Path, cache: Path | None = None) -> Path:
    """A folder GuideLLM's AutoTokenizer loads offline: the GGUF's tokenizer as transformers
    reads it, saved once under ``cache`` (default: ringfuse's cache dir) and reused while the
    GGUF is the same file (path, size, mtime)."""
    from ..runtime.model_files import cache_dir

    gguf = gguf.resolve()
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    root = (cache or cache_dir()) / "tokenizers"
    folder = root / f"{gguf.stem}-{hashlib.sha1(str(gguf).encode()).hexdigest()[:10]}"
    stamp = folder / "ringfuse-source.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == source:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    part = root / f".{folder.name}.{os.getpid()}.part"
    shutil.rmtree(part, ignore_errors=True)
    # its own process, in a neutral folder: transformers >= 5.25 imports Hugging Face's
    # `kernels`, which a source tree's top-level kernels/ on sys.path (the cwd) would shadow
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _EXPORT, str(gguf.parent), gguf.name, str(part)], capture_output=True,
                          text=True, cwd=root, env=env, stdin=subprocess.DEVNULL, timeout=600)  # fmt: skip
    if done.returncode != 0 or not (part / "tokenizer.json").is_file():
        shutil.rmtree(part, ignore_errors=True)
        raise BenchError(f"exporting the tokenizer of {gguf} with transformers failed (exit {done.returncode}):\n"
                         f"{done.stderr[-2000:]}")  # fmt: skip
    (part / stamp.name).write_text(json.dumps(source))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(part, folder)  # whole or absent: a killed export leaves only a .part folder
    return folder


# ---- server processes -----------------------------------------------------------------------


def _death_signal():
    """A preexec_fn asking the kernel to SIGTERM the child when the bench dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG). libc is found here, in the parent: the child runs only
    a call between fork and exec, no import (another thread may hold the import lock)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return lambda: libc.prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class Child:
    """A child process (a server, GuideLLM) in its own session, its output in ``log``,
    stopped with its children by ``stop()`` and killed if the bench dies. For a server,
    ``wait_ready`` finds its address in the log ("listening on URL") and polls ``probe``
    until it answers 200."""

    def __init__(self, name: str, cmd: list[str], log: Path, cwd: Path, env: dict | None = None):
        self.name, self.log = name, log
        self.url: str | None = None
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                         env=env, start_new_session=True, preexec_fn=_death_signal())  # fmt: skip

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code} before it was ready; its log ({self.log}):\n"
                             f"{self.log_tail()}")  # fmt: skip

    def wait_ready(self, probe: str, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while self.url is None:
            self._check_alive()
            found = LISTENING.search(self.log_tail(1 << 16))
            if found:
                self.url = found.group(1)
            elif time.monotonic() > deadline:
                raise BenchError(f"{self.name} printed no address within {timeout:g} s; its log:\n{self.log_tail()}")
            else:
                time.sleep(0.1)
        while True:
            self._check_alive()
            try:
                with _OPENER.open(self.url + probe, timeout=5) as r:
                    if r.status == 200:
                        return self.url
            except (OSError, urllib.error.HTTPError):
                pass  # 503 while loading, or not accepting yet
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: {probe} did not answer 200 within {timeout:g} s; its log:\n"
                                 f"{self.log_tail()}")  # fmt: skip
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful stop), SIGKILL to its whole group after ``timeout``."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever it left in its session (and itself, if it ignored SIGTERM)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def ringfuse_command(s: Settings, max_waiting: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "ringfuse", "serve", "--model", str(s.model), "--quant", s.quant, "--threads",
           str(s.threads), "--max-batch", str(s.max_batch), "--max-model-len", str(s.max_model_len), "--port", "0",
           "--served-model-name", s.model_name, "--log-level", "warning"]  # fmt: skip
    return cmd + (["--max-waiting", str(max_waiting)] if max_waiting is not None else [])


def llama_command(python: Path, s: Settings) -> list[str]:
    # -I: neither this folder (whose module names could shadow others) nor PYTHON* variables
    return [str(python), "-I", str(Path(__file__).with_name("llama_server.py")), str(s.model), "--port", "0",
            "--threads", str(s.threads), "--parallel", str(s.max_batch), "--ctx", str(s.max_batch * s.max_model_len),
            "--alias", s.model_name]  # fmt: skip


# ---- the bench's own client: the 8-prompt round, the burst ----------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never through a proxy


@dataclasses.dataclass
class Reply:
    status: int | None  # None: no HTTP answer (connection error, timeout)
    body: dict | None
    latency_s: float
    error: str | None = None
    retry_after: str | None = None  # the Retry-After header, if any


def post(url: str, body: dict, timeout: float = REQUEST_TIMEOUT_S) -> Reply:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with _OPENER.open(request, timeout=timeout) as r:
            status, headers, data = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, data = e.code, e.headers, e.read()
    except OSError as e:  # refused, reset, timed out
        return Reply(None, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return Reply(status, parsed if isinstance(parsed, dict) else None, latency, retry_after=headers.get("Retry-After"))


def post_at_once(url: str, bodies: list[dict], timeout: float = REQUEST_TIMEOUT_S) -> tuple[float, list[Reply]]:
    """Every body in its own thread, all released together; (wall time from the release to
    the last reply, the replies in order)."""
    replies: list[Reply | None] = [None] * len(bodies)
    gate = threading.Barrier(len(bodies) + 1)

    def one(i: int) -> None:
        gate.wait()
        replies[i] = post(url, bodies[i], timeout)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout + 30)
    wall = time.perf_counter() - t0
    return wall, [r if r is not None else Reply(None, None, wall, "no reply") for r in replies]


def _completion(s: Settings, prompt_ids: list[int], max_tokens: int) -> dict:
    # token ids, greedy, exactly max_tokens new: both engines get the very same work
    return {"model": s.model_name, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}  # fmt: skip


def warm_up(url: str, s: Settings, prompts: list[list[int]]) -> None:
    """Requests ending one step apart, so every batch size from max_batch down to 1 runs
    once before anything is timed (ringfuse captures a decode graph per batch size)."""
    n = s.max_batch
    _, replies = post_at_once(url + "/v1/completions", [_completion(s, prompts[i % len(prompts)], 2 + i)
                                                        for i in range(n)])  # fmt: skip
    bad = [r for r in replies if r.status != 200]
    if bad:
        raise BenchError(f"warm-up: {len(bad)} of {n} requests failed: {_describe(bad[0])}")


def _describe(r: Reply) -> str:
    if r.status is None:
        return r.error or "no reply"
    return f"HTTP {r.status} {json.dumps(r.body)[:300] if r.body else ''}"


def _completion_tokens(r: Reply) -> int:
    try:
        return int(r.body["usage"]["completion_tokens"])
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"a reply without usage.completion_tokens: {_describe(r)}") from None


def measure_concurrent(url: str, s: Settings, prompts: list[list[int]], rounds: int = ROUNDS) -> dict:
    """The prompts sent at once, ``rounds`` times after one untimed round: output tok/s of
    each round (completion tokens / wall time) and their median."""
    bodies = [_completion(s, p, s.output_tokens) for p in prompts]
    rates = []
    for r in range(rounds + 1):
        wall, replies = post_at_once(url + "/v1/completions", bodies)
        bad = [x for x in replies if x.status != 200]
        if bad:
            raise BenchError(f"{len(bodies)} prompts at once: {len(bad)} failed: {_describe(bad[0])}")
        tokens = sum(map(_completion_tokens, replies))
        if r:
            rates.append(tokens / wall)
    return {"concurrency": len(prompts), "tok_s": statistics.median(rates), "rounds_tok_s": rates}


def measure_burst(url: str, s: Settings, prompts: list[list[int]], max_waiting: int) -> dict:
    """4 x max_waiting requests at once against a server with that --max-waiting: how many
    got 200, 429, something else or nothing; the 429s' latencies; then one request more."""
    n = 4 * max_waiting
    bodies = [_completion(s, prompts[i % len(prompts)], BURST_TOKENS) for i in range(n)]
    _, replies = post_at_once(url + "/v1/completions", bodies)
    ok = [r for r in replies if r.status == 200]
    shed = [r for r in replies if r.status == 429]
    other = [r for r in replies if r.status not in (200, 429)]
    after = post(url + "/v1/completions", bodies[0])
    lat = [1e3 * r.latency_s for r in shed]
    return {"max_waiting": max_waiting, "requests": n, "ok": len(ok), "rejected_429": len(shed),
            "other": len(other), "other_examples": [_describe(r) for r in other[:3]],
            "retry_after_on_all_429": all(r.retry_after is not None for r in shed),
            "latency_429_ms": percentiles(lat) if lat else None, "latency_429_max_ms": max(lat) if lat else None,
            "latency_200_ms": percentiles([1e3 * r.latency_s for r in ok]) if ok else None,
            "after_status": after.status, "after_error": None if after.status == 200 else _describe(after)}  # fmt: skip


# ---- offline reference (its own process) ----------------------------------------------------


def offline_worker(spec: str) -> None:
    """Entry of the offline process: LLM.generate on the 8 prompts (batch 8) and the
    prefill time of one random prompt of prompt_tokens tokens, the server's engine settings;
    prints one RESULT line of JSON."""
    import random

    import torch

    from ..runtime import LLM

    s = json.loads(spec)
    llm = LLM(s["model"], quant=s["quant"], max_batch=s["max_batch"], max_model_len=s["max_model_len"],
              threads=s["threads"])  # fmt: skip
    prompts = [llm.encode(p) for p in BATCH_PROMPTS]

    def batch() -> float:
        t0 = time.perf_counter()
        llm.generate(prompts, max_new_tokens=s["output_tokens"], ignore_eos=True)
        return time.perf_counter() - t0

    batch()  # warm-up (decode graphs, first-touch pages)
    walls = [batch() for _ in range(s["rounds"])]
    rng = random.Random(0)
    vocab = llm.config.vocab_size

    def prefill() -> float:
        # fresh random tokens each time: nothing comes from the prefix cache
        ids = [rng.randrange(1000, vocab) for _ in range(s["prompt_tokens"])]
        t0 = time.perf_counter()
        llm.generate([ids], max_new_tokens=1, ignore_eos=True)
        return time.perf_counter() - t0

    prefill()
    prefills = [prefill() for _ in range(s["rounds"])]
    tokens = len(prompts) * s["output_tokens"]
    out = {"prompts": prompts, "b8_tok_s": tokens / statistics.median(walls), "b8_walls_s": walls,
           "prefill_ms": 1e3 * statistics.median(prefills), "prefill_walls_ms": [1e3 * p for p in prefills],
           "prefill_tokens": s["prompt_tokens"], "threads": torch.get_num_threads()}  # fmt: skip
    print("RESULT " + json.dumps(out), flush=True)


def run_offline(s: Settings, workdir: Path) -> dict:
    spec = dict(model=str(s.model), quant=s.quant, max_batch=s.max_batch, max_model_len=s.max_model_len,
                threads=s.threads, output_tokens=s.output_tokens, prompt_tokens=s.prompt_tokens,
                rounds=ROUNDS)  # fmt: skip
    code = f"from ringfuse.bench.serve import offline_worker; offline_worker({json.dumps(json.dumps(spec))})"
    log = workdir / "offline.log"
    with open(log, "w") as err:
        done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True, cwd=workdir,
                              stdin=subprocess.DEVNULL, timeout=1800)  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise BenchError(f"the offline LLM.generate run failed (exit {done.returncode}); its log ({log}):\n"
                     f"{log.read_text()[-2000:]}")  # fmt: skip


# ---- GuideLLM -------------------------------------------------------------------------------


def guidellm_command(exe: Path, url: str, s: Settings, tokenizer: Path, out_json: Path) -> list[str]:
    return [str(exe), "run",
            "--backend", f"kind=openai_http,target={url},model={s.model_name},request_format=/v1/completions",
            "--profile", "kind=concurrent", "--override", "profile.streams", ",".join(map(str, CONCURRENCY)),
            "--constraint", f"kind=max_requests,count={s.requests}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--data", f"kind=synthetic_text,prompt_tokens={s.prompt_tokens},output_tokens={s.output_tokens}",
            "--seed", "kind=static,value=1",  # the same prompts for both engines
            "--output", f"kind=json,path={out_json}", "--output", "kind=console", "--disable-progress"]  # fmt: skip


def guidellm_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # one worker process drives 16 streams easily; its default of 10 would take CPU from the server
    env.setdefault("GUIDELLM__MAX_WORKER_PROCESSES", "1")
    for key in ("NO_PROXY", "no_proxy"):  # httpx reads the proxy variables: keep 127.0.0.1 direct
        env[key] = ",".join(filter(None, [env.get(key), "127.0.0.1", "localhost"]))
    return env


def run_guidellm(exe: Path, url: str, s: Settings, tokenizer: Path, workdir: Path, tag: str) -> Path:
    out_json, log = workdir / f"guidellm-{tag}.json", workdir / f"guidellm-{tag}.log"
    with Child(f"GuideLLM ({tag})", guidellm_command(exe, url, s, tokenizer, out_json), log, workdir,
               guidellm_env()) as proc:  # fmt: skip
        try:
            code = proc.proc.wait(GUIDELLM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"GuideLLM against {tag} did not finish within {GUIDELLM_TIMEOUT_S} s; log: {log}") from None
    if code != 0 or not out_json.is_file():
        raise BenchError(f"GuideLLM against {tag} failed (exit {code}); its log ({log}):\n{proc.log_tail()}")
    return out_json


def percentiles(values: list[float]) -> dict:
    """p50 / p90 / p99 with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentiles of no values")
    out = {}
    for name in PERCENTILES:
        pos = (len(xs) - 1) * float(name[1:]) / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[name] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def _summary(metric: dict, scale: float = 1.0) -> dict | None:
    got = (metric or {}).get("successful") or {}
    if not got.get("count"):
        return None
    return {p: got["percentiles"][p] * scale for p in PERCENTILES}


def _tpot_ms(record: dict) -> float | None:
    """vLLM's TPOT of one GuideLLM request record: (last token - first token) / (n - 1)."""
    t = record["info"]["timings"]
    out = record.get("output_metrics") or {}
    n = out.get("total_tokens") or out.get("text_tokens") or t.get("token_iterations")
    first, last = t.get("first_token_iteration"), t.get("last_token_iteration")
    if not n or n < 2 or first is None or last is None:
        return None
    return 1e3 * (last - first) / (n - 1)


def parse_guidellm(path: Path) -> dict:
    """GuideLLM's JSON as {"version", "levels": [per concurrency level, ascending]}; each
    level: concurrency, requests (successful / errored / incomplete), ttft_ms, tpot_ms,
    itl_ms, e2e_ms ({p50, p90, p99} or None without successful requests), output_tok_s,
    prompt_tokens_p50, output_tokens_p50, duration_s."""
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict) or not isinstance(d.get("benchmarks"), list):
        raise BenchError(f"{path}: not a GuideLLM benchmarks JSON (no 'benchmarks' list)")
    levels = []
    for b in d["benchmarks"]:
        m = b["metrics"]
        tpots = [v for v in map(_tpot_ms, (b.get("requests") or {}).get("successful") or []) if v is not None]
        totals = m["request_totals"]
        tokens = _summary(m.get("output_token_count"))
        prompt = _summary(m.get("prompt_token_count"))
        levels.append({
            "concurrency": b["config"]["strategy"]["streams"],
            "requests": {k: totals.get(k, 0) for k in ("successful", "errored", "incomplete")},
            "ttft_ms": _summary(m["time_to_first_token_ms"]),
            "tpot_ms": percentiles(tpots) if tpots else None,
            "itl_ms": _summary(m["inter_token_latency_ms"]),
            "e2e_ms": _summary(m["request_latency"], 1e3),  # GuideLLM keeps it in seconds
            "output_tok_s": m["output_tokens_per_second"]["successful"]["mean"] if totals.get("successful") else 0.0,
            "prompt_tokens_p50": prompt["p50"] if prompt else None,
            "output_tokens_p50": tokens["p50"] if tokens else None,
            "duration_s": b.get("duration"),
        })  # fmt: skip
    levels.sort(key=lambda lv: lv["concurrency"])
    return {"version": (d.get("metadata") or {}).get("guidellm_version"), "levels": levels}


# ---- report ---------------------------------------------------------------------------------


def _level(results: dict, engine: str, c: int) -> dict | None:
    eng = results["engines"].get(engine) or {}
    return next((lv for lv in eng.get("levels") or () if lv["concurrency"] == c), None)


def _target(name: str, measured: str, target: str, met: bool | None) -> dict:
    return {"target": name, "measured": measured, "goal": target, "met": met}


def evaluate_targets(results: dict) -> list[dict]:
    """The serving issue's targets from the results; ``met`` is None where a part is missing."""
    out = []
    rf = results["engines"].get(RINGFUSE) or {}
    off = results.get("offline")
    c8 = rf.get("concurrent")
    if off and c8:
        ratio = c8["tok_s"] / off["b8_tok_s"]
        peer = (results["engines"].get(LLAMA) or {}).get("concurrent")
        out.append(_target(f"server tok/s at concurrency {c8['concurrency']} vs offline LLM.generate (same 8 prompts)",
                           f"{c8['tok_s']:.1f} vs {off['b8_tok_s']:.1f} tok/s = {100 * ratio:.0f}%"
                           + (f" (llama.cpp's server: {peer['tok_s']:.1f})" if peer else ""),
                           f">= {100 * TARGETS['overhead_ratio']:.0f}%",
                           ratio >= TARGETS["overhead_ratio"]))  # fmt: skip
    else:
        out.append(_target("server tok/s at concurrency 8 vs offline LLM.generate", "not measured", ">= 90%", None))
    lv1 = _level(results, RINGFUSE, 1)
    if off and lv1 and lv1["ttft_ms"]:
        extra = lv1["ttft_ms"]["p50"] - off["prefill_ms"]
        out.append(_target(f"TTFT p50 at concurrency 1 vs offline prefill ({off['prefill_tokens']} tokens)",
                           f"{lv1['ttft_ms']['p50']:.1f} vs {off['prefill_ms']:.1f} ms ({extra:+.1f} ms)",
                           f"<= +{TARGETS['ttft_extra_ms']:.0f} ms", extra <= TARGETS["ttft_extra_ms"]))  # fmt: skip
    else:
        out.append(_target("TTFT p50 at concurrency 1 vs offline prefill", "not measured", "<= +10 ms", None))
    tok, ttft = [], []
    for c in CONCURRENCY:
        a, b = _level(results, RINGFUSE, c), _level(results, LLAMA, c)
        if a and b and b["output_tok_s"] > 0:
            tok.append((c, a["output_tok_s"] / b["output_tok_s"]))
        if a and b and a["ttft_ms"] and b["ttft_ms"]:
            ttft.append((c, a["ttft_ms"]["p50"] / b["ttft_ms"]["p50"]))
    complete = len(tok) == len(CONCURRENCY)
    out.append(_target("output tok/s vs llama.cpp's server, every concurrency",
                       " / ".join(f"c{c} {r:.2f}x" for c, r in tok) or "not measured",
                       f">= {TARGETS['vs_peer_tok_s']:.1f}x",
                       all(r >= TARGETS["vs_peer_tok_s"] for _, r in tok) if complete else None))  # fmt: skip
    complete = len(ttft) == len(CONCURRENCY)
    out.append(_target("TTFT p50 vs llama.cpp's server, every concurrency",
                       " / ".join(f"c{c} {r:.2f}x" for c, r in ttft) or "not measured",
                       f"<= {TARGETS['vs_peer_ttft']:.1f}x",
                       all(r <= TARGETS["vs_peer_ttft"] for _, r in ttft) if complete else None))  # fmt: skip
    burst = results.get("burst")
    if burst:
        answered = burst["ok"] + burst["rejected_429"]
        out.append(_target(f"burst of {burst['requests']} (--max-waiting {burst['max_waiting']}): every request "
                           "gets 200 or 429", f"{burst['ok']} x 200, {burst['rejected_429']} x 429, "
                           f"{burst['other']} other", "all 200/429", answered == burst["requests"]))  # fmt: skip
        p99 = (burst["latency_429_ms"] or {}).get("p99")
        out.append(_target("burst: p99 latency of the 429s", "no 429" if p99 is None else f"{p99:.1f} ms",
                           f"< {TARGETS['burst_429_p99_ms']:.0f} ms",
                           None if p99 is None else p99 < TARGETS["burst_429_p99_ms"]))  # fmt: skip
        out.append(_target("a request after the burst", "no reply" if burst["after_status"] is None
                           else f"HTTP {burst['after_status']}", "200", burst["after_status"] == 200))  # fmt: skip
    else:
        out.append(_target("burst of 4x --max-waiting requests", "not measured", "all 200/429, 429 p99 < 50 ms", None))
    return out


def _ppp(d: dict | None) -> str:
    return "-" if not d else "/".join(f"{d[p]:.1f}" for p in PERCENTILES)


def print_report(results: dict) -> None:
    from .harness import print_table

    cfg = results["config"]
    rows = []
    for engine in (RINGFUSE, LLAMA):
        eng = results["engines"].get(engine)
        if not eng:
            continue
        for lv in eng.get("levels") or ():
            peer = _level(results, LLAMA, lv["concurrency"]) if engine == RINGFUSE else None
            tok_ratio = ttft_ratio = "-"
            if peer and peer["output_tok_s"] > 0:
                tok_ratio = f"{lv['output_tok_s'] / peer['output_tok_s']:.2f}x"
            if peer and peer["ttft_ms"] and lv["ttft_ms"]:
                ttft_ratio = f"{lv['ttft_ms']['p50'] / peer['ttft_ms']['p50']:.2f}x"
            failed = lv["requests"]["errored"] + lv["requests"]["incomplete"]
            rows.append([engine, str(lv["concurrency"]), _ppp(lv["ttft_ms"]), _ppp(lv["tpot_ms"]), _ppp(lv["itl_ms"]),
                         _ppp(lv["e2e_ms"]), f"{lv['output_tok_s']:.1f}", tok_ratio, ttft_ratio,
                         f"{lv['requests']['successful']}" + (f" ({failed} failed)" if failed else "")])  # fmt: skip
    title = (f"bench serve: {cfg['model_name']} {cfg['quant']} (llama.cpp: the same GGUF), GuideLLM "
             f"{cfg.get('guidellm_version') or '?'} concurrent, /v1/completions streaming, prompt "
             f"{cfg['prompt_tokens']} / output {cfg['output_tokens']} tokens, {cfg['requests']} requests per level, "
             f"{cfg['threads']} threads; ratios ringfuse vs llama.cpp, same run")  # fmt: skip
    note = "TPOT: (e2e - TTFT) / (n - 1) per request (vLLM's); ITL: GuideLLM's, the same gaps weighted by n - 1."
    print_table(title, ["engine", "conc", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99", "ITL ms p50/p90/p99",
                        "e2e ms p50/p90/p99", "out tok/s", "tok/s vs llama.cpp", "TTFT p50 vs llama.cpp", "requests"],
                rows, note=note, left=2)  # fmt: skip
    trows = [[t["target"], t["measured"], t["goal"], {True: "yes", False: "NO", None: "-"}[t["met"]]]
             for t in results["targets"]]  # fmt: skip
    print_table("bench serve: targets (same run)", ["target", "measured", "goal", "met"], trows, left=1)


def write_plot(results: dict, path: Path) -> None:
    """Latency percentiles (TTFT, TPOT, e2e) and output throughput against concurrency,
    one colour per engine, p50 solid / p90 dashed / p99 dotted."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cfg = results["config"]
    panels = [("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("e2e_ms", "end-to-end latency (ms)"),
              ("output_tok_s", "output throughput (tok/s)")]  # fmt: skip
    colors = {RINGFUSE: "tab:blue", LLAMA: "tab:orange"}
    styles = {"p50": "-", "p90": "--", "p99": ":"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, label) in zip(axes.flat, panels):
        for engine, color in colors.items():
            levels = [lv for lv in (results["engines"].get(engine) or {}).get("levels") or () if lv.get(key)]
            xs = [lv["concurrency"] for lv in levels]
            if not xs:
                continue
            if key == "output_tok_s":
                ax.plot(xs, [lv[key] for lv in levels], "o-", color=color, label=engine)
            else:
                for p, style in styles.items():
                    ax.plot(xs, [lv[key][p] for lv in levels], style, marker="o", color=color, label=f"{engine} {p}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"ringfuse serve vs llama.cpp server: {cfg['model_name']} {cfg['quant']}, prompt "
                 f"{cfg['prompt_tokens']} / output {cfg['output_tokens']} tokens, {cfg['threads']} threads "
                 "(GuideLLM)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, json_path: Path) -> Path:
    """Targets, the two tables, the JSON at ``json_path`` and the PNG beside it (returned)."""
    results["targets"] = evaluate_targets(results)
    png = json_path.with_suffix(".png")
    results["plot"] = str(png)
    print_report(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_plot(results, png)
    json_path.write_text(json.dumps(results, indent=1))
    print(f"bench serve: JSON {json_path}\nbench serve: plot {png}")
    return png


# ---- the run --------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"bench serve: {message}", file=sys.stderr, flush=True)


def _load_test(server: Child, probe: str, s: Settings, guidellm: Path, tok: Path, workdir: Path, tag: str,
               prompts, eng: dict) -> str | None:
    """Once ``server`` answers ``probe``: a warm-up and the 8 prompts at once (when there are
    prompts), then GuideLLM; the server is stopped either way. Fills ``eng`` with the
    figures; returns GuideLLM's version."""
    with server:
        url = server.wait_ready(probe)
        _say(f"{server.name} ready on {url}: warm-up, 8 prompts at once, then GuideLLM")
        if prompts:
            warm_up(url, s, prompts)
            eng["concurrent"] = measure_concurrent(url, s, prompts)
        raw = run_guidellm(guidellm, url, s, tok, workdir, tag)
    parsed = parse_guidellm(raw)
    eng.update(levels=parsed["levels"], guidellm_json=str(raw))
    return parsed["version"]


def _bench_ringfuse(s: Settings, guidellm: Path, tok: Path, workdir: Path, results: dict) -> None:
    offline = results["offline"] = run_offline(s, workdir)
    prompts = offline["prompts"]
    _say(f"offline LLM.generate: {offline['b8_tok_s']:.1f} tok/s on the 8 prompts; prefill of "
         f"{s.prompt_tokens} tokens {offline['prefill_ms']:.1f} ms")  # fmt: skip
    eng = results["engines"][RINGFUSE] = {}
    server = Child("ringfuse serve", ringfuse_command(s), workdir / "ringfuse-serve.log", workdir)
    results["config"]["guidellm_version"] = _load_test(server, "/ready", s, guidellm, tok, workdir, "ringfuse",
                                                       prompts, eng)  # fmt: skip
    with Child("ringfuse serve (burst)", ringfuse_command(s, BURST_MAX_WAITING), workdir / "ringfuse-serve-burst.log",
               workdir) as server:  # fmt: skip
        url = server.wait_ready("/ready")
        _say(f"burst: {4 * BURST_MAX_WAITING} requests at once against --max-waiting {BURST_MAX_WAITING}")
        results["burst"] = measure_burst(url, s, prompts, BURST_MAX_WAITING)


def _bench_llama(s: Settings, python: Path, guidellm: Path, tok: Path, workdir: Path, results: dict) -> None:
    prompts = (results.get("offline") or {}).get("prompts")
    eng = results["engines"][LLAMA] = {}
    server = Child("llama.cpp server", llama_command(python, s), workdir / "llama-server.log", workdir)
    version = _load_test(server, "/health", s, guidellm, tok, workdir, "llama.cpp", prompts, eng)
    results["config"].setdefault("guidellm_version", version)


def run(model=None, quant: str | None = None, threads: int | None = None, requests: int | None = None,
        prompt_tokens: int | None = None, output_tokens: int | None = None, json_path=None,
        quick: bool = False) -> int:  # fmt: skip
    """The whole bench; the exit status (2: something it needs is missing, 1: a stage failed)."""
    from ..runtime.model_files import DEFAULT_MODEL_NAME, cache_dir, resolve_model

    try:
        guidellm = find_guidellm()
    except BenchError as e:
        _say(f"error: {e}")
        return 2
    missing = missing_modules()
    if missing:
        _say(f"error: missing in this environment: {', '.join(missing)}; install them with {BENCH_EXTRA}")
        return 2
    path = resolve_model(model)
    if path.suffix != ".gguf" or not path.is_file():
        _say(f"error: --model must be a .gguf file (llama.cpp and the tokenizer export read GGUF), got {path}")
        return 2
    name = DEFAULT_MODEL_NAME if model is None else path.stem
    try:
        s = make_settings(path, name, quant, threads, requests, prompt_tokens, output_tokens, quick)
    except ValueError as e:
        _say(f"error: {e}")
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(json_path) if json_path else cache_dir() / "bench" / f"serve-{stamp}.json"
    workdir = json_path.with_name(json_path.stem + "-files")
    workdir.mkdir(parents=True, exist_ok=True)
    peer = peer_python()
    if isinstance(peer, str):
        _say(f"llama.cpp skipped: {peer}")
    config = dataclasses.asdict(s)
    config.update(model=str(s.model), concurrency=list(CONCURRENCY), max_batch=s.max_batch,
                  max_model_len=s.max_model_len, guidellm=str(guidellm), workdir=str(workdir))  # fmt: skip
    results: dict = {"config": config, "engines": {}, "errors": [],
                     "skipped": {LLAMA: peer} if isinstance(peer, str) else {}}  # fmt: skip
    _say(f"files in {workdir}; exporting the tokenizer for GuideLLM (once per GGUF)")
    try:
        tok = tokenizer_dir(s.model)
    except BenchError as e:
        _say(f"error: {e}")
        return 1
    results["config"]["tokenizer"] = str(tok)
    stages = [("ringfuse", lambda: _bench_ringfuse(s, guidellm, tok, workdir, results))]
    if not isinstance(peer, str):
        stages.append(("llama.cpp", lambda: _bench_llama(s, peer, guidellm, tok, workdir, results)))
    for engine, stage in stages:
        try:
            stage()
        except (BenchError, OSError, subprocess.SubprocessError) as e:  # the other engine can still be measured
            _say(f"error: the {engine} part failed: {e}")
            results["errors"].append(f"{engine}: {e}")
    report(results, json_path)
    return 1 if results["errors"] else 0
