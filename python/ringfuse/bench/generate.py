"""``ringfuse bench generate``: the runtime end to end against HF transformers (fp32, eager
attention) in the same run, on the default model unless --model is given.

Batch 1: greedy, the chat-templated prompt "Explain photosynthesis." (~33 tokens), exactly
64 new tokens (EOS ignored), 2 threads. Each engine runs in its own process (clean peak
RSS, no shared caches): a warm-up, then 3 runs of 1 new token and 3 of 64; medians.
prefill = wall time to the first token; decode tok/s = 63 / (wall(64) - wall(1)), the
median over paired rounds (prefill_and_decode_walls). Prefix
caching is off (each run computes its whole prompt, as llama.cpp's cache_prompt: false).
Batch 8: 8 different prompts, 64 new tokens each, total tok/s = 512 / wall.
``passes`` > 1 runs every engine once per pass, passes one after another, and reports the
medians (the VM's memory bandwidth drifts over minutes: one pass can catch one engine in a
slow spell), with each pass's decode rate.
Python overhead: the share of a batch-1 decode step spent outside kernels, measured with
sys.setprofile over 16 steps against the unprofiled step time. Inside: ringfuse._C calls and
torch ops (allocation included); outside: Python code, builtins (isinstance...) and tensor
metadata calls (stride, data_ptr, view...), which are C functions but glue, not work.

Peers (``--peers``, default model only): CTranslate2 and llama.cpp, timed in the same run by
the project's peer harness (``bench_peers.py -e <engine>`` in its own venv, found through
$RINGFUSE_PEERS_DIR or ../shared/peers; $PEERS_VENV, default /tmp/peers-venv). It uses the
same prompt, the same 8 batch prompts, 64 new tokens and the same medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .limits import cpu_path

PROMPT = "Explain photosynthesis."
BATCH_PROMPTS = [  # the peer harness's 8 prompts (33-46 tokens with the chat template)
    PROMPT, "Write a poem about the sea.", "What is a black hole?", "List three uses of copper and explain each one.",
    "Tell me a joke.", "How do vaccines train the immune system?", "Describe Paris.",
    "Why do cats purr, and what does it mean when they do it?",
]  # fmt: skip
NEW_TOKENS = 64
ENGINES = [("ringfuse", "fp32", "none"), ("ringfuse", "bf16", "none"), ("ringfuse", "fp32", "w8a16"),
           ("ringfuse", "fp32", "w8a8"), ("hf", "fp32", "none")]  # fmt: skip


def median_wall(fn, rounds, sync=None):
    """Median wall time of ``rounds`` calls; ``sync`` (a GPU's synchronize) runs before the
    clock starts and before it stops."""
    walls = []
    for _ in range(rounds):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def prefill_and_decode_walls(run_one, run_new, rounds, sync=None) -> tuple[float, float]:
    """(wall of a 1-token generate, wall of the n - 1 decode steps of an n-token one): the
    two are timed back to back in each of ``rounds`` rounds, and the decode wall is the
    median of each round's difference, so a drift between rounds cancels. A tiny model can
    decode faster than the clock's noise, and the median difference can come out zero or
    negative (a difference of medians gave a negative rate): then the rounds double, up to
    8x; if it never turns positive, a RuntimeError says so instead of a meaningless rate."""
    for _ in range(4):
        ones, diffs = [], []
        for _ in range(rounds):
            one = median_wall(run_one, 1, sync)
            ones.append(one)
            diffs.append(median_wall(run_new, 1, sync) - one)
        decode = statistics.median(diffs)
        if decode > 0:
            return statistics.median(ones), decode
        rounds *= 2
    raise RuntimeError(f"decode took no measurable time in {rounds // 2} rounds: generate more new tokens")


def _ringfuse_worker(model, dtype, quant, rounds, batch8):
    import torch

    from ..runtime import LLM

    # prefix caching off: every timed run prefills its whole prompt, as the peers do
    llm = LLM(model, dtype=dtype, quant=quant, max_batch=8, max_model_len=1024, prefix_caching=False)
    ids = llm.encode(PROMPT)

    def run(n, prompts=(ids,)):
        return llm.generate(list(prompts), max_new_tokens=n, ignore_eos=True)

    run(1), run(NEW_TOKENS)  # warm-up of both timed shapes
    w1, decode = prefill_and_decode_walls(lambda: run(1), lambda: run(NEW_TOKENS), rounds)
    out = {"prompt_tokens": len(ids), "prefill_ms": w1 * 1e3, "decode_tok_s": (NEW_TOKENS - 1) / decode,
           "tokens": run(NEW_TOKENS)[0].token_ids}  # fmt: skip
    out["python_overhead"] = _python_overhead(llm, ids)
    if batch8:
        prompts = [llm.encode(p) for p in BATCH_PROMPTS]
        run(8, prompts)
        out["b8_tok_s"] = 8 * NEW_TOKENS / median_wall(lambda: run(NEW_TOKENS, prompts), max(1, rounds - 1))
    out["threads"] = torch.get_num_threads()
    return out


_GLUE = frozenset({"stride", "size", "dim", "numel", "nbytes", "element_size", "data_ptr", "is_contiguous", "view",
                   "reshape", "contiguous", "untyped_storage", "get_num_threads", "is_grad_enabled", "is_compiling"})


def _is_work(fn) -> bool:
    """A C function that does work (a kernel, a torch op), not glue (see the module doc)."""
    return getattr(fn, "__module__", None) not in ("builtins", "math") and getattr(fn, "__name__", "") not in _GLUE


def _python_overhead(llm, ids, steps=16) -> float:
    """1 - (time inside kernels and torch ops) / (step wall time) for batch-1 decode steps."""
    from ..runtime.sampling import SamplingParams

    def decode_steps(profiled):
        llm.add_request(ids, SamplingParams(max_new_tokens=steps + 2, ignore_eos=True))
        llm.step()  # prefill
        inside, depth, t_enter = 0.0, 0, 0.0

        def prof(frame, event, arg):
            nonlocal inside, depth, t_enter
            if event == "c_call":
                if depth == 0:
                    t_enter = time.perf_counter() if _is_work(arg) else None
                depth += 1
            elif event in ("c_return", "c_exception"):
                depth -= 1
                if depth == 0 and t_enter is not None:
                    inside += time.perf_counter() - t_enter

        t0 = time.perf_counter()
        if profiled:
            sys.setprofile(prof)
        for _ in range(steps):
            llm.step()
        sys.setprofile(None)
        wall = time.perf_counter() - t0
        llm.abort_all()
        return wall, inside

    decode_steps(False)
    wall = min(decode_steps(False)[0] for _ in range(3))
    inside = min(decode_steps(True)[1] for _ in range(3))
    return max(0.0, 1.0 - inside / wall)


def _hf_worker(model_path, rounds, batch8):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = (str(model_path.parent), model_path.name) if model_path.suffix == ".gguf" else (str(model_path), None)
    kw = {"gguf_file": name} if name else {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kw).eval()

    def enc(p):
        return tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False)  # fmt: skip

    def run(n, prompts):
        seqs = [enc(p) for p in prompts]
        width = max(map(len, seqs))
        ids = torch.tensor([[tok.pad_token_id or 0] * (width - len(s)) + s for s in seqs])  # left padding
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.pad_token_id)  # fmt: skip

    # warm-up of both timed shapes: HF's first generate(max_new_tokens=1) calls take ~9x
    # longer than later ones here, which would make its decode rate meaningless
    for _ in range(2):
        run(1, [PROMPT]), run(NEW_TOKENS, [PROMPT])
    w1, decode = prefill_and_decode_walls(lambda: run(1, [PROMPT]), lambda: run(NEW_TOKENS, [PROMPT]), rounds)
    n_prompt = len(enc(PROMPT))
    out = {"prompt_tokens": n_prompt, "prefill_ms": w1 * 1e3, "decode_tok_s": (NEW_TOKENS - 1) / decode,
           "tokens": run(NEW_TOKENS, [PROMPT])[0, n_prompt:].tolist()}  # fmt: skip
    if batch8:
        run(8, BATCH_PROMPTS)
        out["b8_tok_s"] = 8 * NEW_TOKENS / median_wall(lambda: run(NEW_TOKENS, BATCH_PROMPTS), max(1, rounds - 1))
    out["threads"] = torch.get_num_threads()
    return out


def worker(spec: str) -> None:
    """Entry of one engine's process: prints one JSON line with its figures and peak RSS."""
    import resource

    import torch

    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    if s["engine"] == "hf":
        from pathlib import Path

        out = _hf_worker(Path(s["path"]), s["rounds"], s["batch8"])
    else:
        out = _ringfuse_worker(s["path"], s["dtype"], s["quant"], s["rounds"], s["batch8"])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def spawn_worker(module: str, spec: dict) -> tuple[dict | None, subprocess.CompletedProcess]:
    """``ringfuse.bench.<module>.worker(spec)`` in a fresh process: (the JSON of its
    ``RESULT`` line, or None when it printed none; the finished process)."""
    code = f"from ringfuse.bench.{module} import worker; worker({json.dumps(json.dumps(spec))})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), done
    return None, done


def _spawn(spec: dict) -> dict | None:
    result, done = spawn_worker("generate", spec)
    if result is None:
        print(f"  {spec['engine']} {spec['dtype']} {spec['quant']} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
    return result


PEER_ENGINES = ["ct2-fp32", "ct2-int8", "llama-f32", "llama-q8_0", "llama-q4_1", "ct2-int8-b8"]
PEER_ENGINES_QUICK = ["ct2-fp32", "ct2-int8", "llama-f32", "llama-q8_0", "ct2-int8-b8"]


def peer_harness() -> tuple[Path, Path] | str:
    """(bench_peers.py, the peers venv's python), or why the peers cannot run."""
    folder = Path(os.environ.get("RINGFUSE_PEERS_DIR", "../shared/peers")).resolve()
    script = folder / "bench_peers.py"
    python = Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv")) / "bin" / "python"
    if not script.is_file():
        return f"no peer harness at {script} (set RINGFUSE_PEERS_DIR to the folder holding bench_peers.py)"
    if not python.is_file():
        return f"no peers venv at {python.parent.parent}: run setup.sh, export_hf.py and requant_gguf.py in {folder}"
    return script, python


def _spawn_peer(script: Path, python: Path, engine: str, threads: int, rounds: int) -> dict | None:
    """One peer engine in its own process: its JSON line, plus its peak RSS (wait4)."""
    env = dict(os.environ, BENCH_THREADS=str(threads), BENCH_REPS=str(rounds))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(python), str(script), "-e", engine], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, env=env, cwd=script.parent)  # fmt: skip
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            r = json.loads(lines[-1])
            r["peak_rss_mb"] = usage.ru_maxrss / 1024
            return r
        err.seek(0)
        print(f"  peer {engine} failed (exit {proc.returncode}):\n{err.read().decode()[-1500:]}", file=sys.stderr)
        return None


def _median_result(runs: list[dict]) -> dict:
    """One engine's figures over the passes: medians of the rates and times, the peak RSS
    maximum, the tokens of the first pass."""
    out = dict(runs[0])
    for key in ("prefill_ms", "decode_tok_s", "b8_tok_s", "python_overhead"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["passes"] = [round(r["decode_tok_s"], 1) for r in runs]
    return out


def run(model=None, quick: bool = False, rounds: int = 3, peers: bool = False, threads: int = 2,
        passes: int = 1) -> int:  # fmt: skip
    from rich.progress import Progress

    from ..runtime.model_files import resolve_model
    from .harness import print_table

    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        print(f"bench generate: --passes must be a positive int, got {passes!r}", file=sys.stderr)
        return 2
    path = str(resolve_model(model))
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench generate: the HF transformers baseline needs `pip install transformers`", file=sys.stderr)
        return 1
    engines = [e for e in ENGINES if not quick or e[1:] in (("fp32", "none"), ("fp32", "w8a16"))]
    engines.sort(key=lambda e: e[0] != "hf")  # the baseline first
    harness = peer_harness() if peers else None
    if peers and model is not None:
        harness = "the peer harness runs the default model only"
    if isinstance(harness, str):
        print(f"bench generate: --peers skipped: {harness}", file=sys.stderr)
        harness = None
    peer_engines = (PEER_ENGINES_QUICK if quick else PEER_ENGINES) if harness else []
    runs: dict[str, list] = {}
    total, done = passes * (len(engines) + len(peer_engines)), 0
    with Progress(transient=True) as progress:
        task = progress.add_task("bench generate", total=total)
        for p in range(passes):  # every engine once per pass: the machine's drift hits all alike
            for engine, dtype, quant in engines:
                label = "hf-fp32-eager" if engine == "hf" else f"ringfuse-{dtype}" + ("" if quant == "none" else f"-{quant}")
                progress.update(task, description=f"pass {p + 1}/{passes}: {label} ({done + 1}/{total})")
                spec = dict(engine=engine, dtype=dtype, quant=quant, path=path, rounds=rounds, batch8=True, threads=threads)
                runs.setdefault(label, []).append(_spawn(spec))
                done += 1
                progress.advance(task)
            for name in peer_engines:
                progress.update(task, description=f"pass {p + 1}/{passes}: peer {name} ({done + 1}/{total})")
                r = _spawn_peer(*harness, name, threads, rounds)
                if name.endswith("-b8"):  # the batch-8 figure joins its engine's row of this pass
                    if r is not None and runs.get(name[:-3]) and runs[name[:-3]][-1] is not None:
                        runs[name[:-3]][-1]["b8_tok_s"] = r["total_tok_s"]
                else:
                    runs.setdefault(name, []).append(r)
                done += 1
                progress.advance(task)
    results = {label: _median_result([r for r in rs if r is not None]) if any(rs) else None
               for label, rs in runs.items()}  # fmt: skip
    base = results.get("hf-fp32-eager")
    if base is None:
        return 1
    rows = []
    for label, r in results.items():
        if r is None:
            continue
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], base["tokens"])) if a != b), len(r["tokens"]))
        b8 = r.get("b8_tok_s")
        rows.append([label, f"{r['prefill_ms']:.1f}", f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x",
                     "-" if b8 is None else f"{b8:.1f}", "-" if b8 is None else f"{b8 / base['decode_tok_s']:.2f}x",
                     f"{100 * r['python_overhead']:.0f}%" if "python_overhead" in r else "-",
                     f"{r['peak_rss_mb']:.0f}", f"{same}/{len(r['tokens'])}"]
                    + ([" / ".join(map(str, r["passes"]))] if passes > 1 else []))  # fmt: skip
    print_table(f"bench generate: {path}, batch 1 prompt {base['prompt_tokens']} tokens, {NEW_TOKENS} new, greedy, "
                f"{threads} threads, ringfuse cpu path {cpu_path()}; ratios vs hf-fp32-eager batch-1 decode, same run"
                + (f"; medians of {passes} interleaved passes" if passes > 1 else ""),
                ["engine", "prefill ms", "decode tok/s", "vs HF", "b8 total tok/s", "b8 vs HF b1", "py overhead",
                 "peak RSS MB", "same tokens as HF"] + (["decode tok/s per pass"] if passes > 1 else []), rows)  # fmt: skip
    return 0
