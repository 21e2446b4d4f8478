"""``ringfuse`` command line: ``info``, ``bench``, ``generate``, ``chat`` and ``serve``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BENCHES = ("limits", "rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "norms", "attention", "rotary_embedding", "silu_mul", "int8", "linear", "allreduce", "tp", "generate", "serve", "gpu")


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx_vnni", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in have]
    except OSError:
        pass
    return []


def _nccl_line(_C) -> str:
    """The NCCL transport: built or not, and the libnccl.so.2 it would load (found, not loaded)."""
    if not hasattr(_C, "nccl_ring_run"):
        return "nccl: not built"
    import os

    from .distributed.allreduce import nccl_library_path

    path = nccl_library_path()
    found = path if os.path.isabs(path) else f"{path} from the loader's path (no nvidia-nccl wheel found)"
    return f"nccl (built; CUDA tensors; loads {found})"


def info() -> dict:
    """What this install has: versions, CPU features, backends built, threads."""
    import torch

    import ringfuse
    from ringfuse import _C, ops

    build = _C.build_info()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda_device = torch.cuda.is_available()
    return {
        "ringfuse": ringfuse.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "compiler": build["compiler"],
        "openmp": build["openmp"],
        "cpu flags": " ".join(_cpu_flags()) or "unknown",
        "cpu path": build["isa"],
        "cpu int8 gemm path": build["int8_gemm_isa"],
        "threads": torch.get_num_threads(),
        "backend cpu": f"built ({build['isa']}, OpenMP)",
        "backend cuda": (
            f"built (CUDA runtime {build['cuda_runtime_version']}, sm {build['cuda_archs']})"
            if build["cuda"] else "not built (no CUDA toolkit at build time)"
        ),
        "backend triton": (
            f"triton {triton_version}, " + ("CUDA device present" if cuda_device else "no CUDA device (interpreter only)")
            if triton_version else "triton not installed"
        ),
        "cuda tensors run on": ops.cuda_backend(),
        "distributed transports": ("shm (C++ shared-memory ring), torch (send/recv)" if hasattr(_C, "shm_ring_open")
                                   else "torch (send/recv)") + "; " + _nccl_line(_C),
        "distributed auto picks": "shm when all ranks share this host and the tensor is on CPU, nccl for CUDA "
                                  "tensors" + ("" if hasattr(_C, "nccl_ring_run") else " (not built)") + ", else torch",
    }


def _print_info() -> None:
    from .bench.harness import print_table

    print_table("ringfuse info", ["item", "value"], [[k, str(v)] for k, v in info().items()], left=2)


def _check_bench_flags(args, parser) -> None:
    """Each flag applies to some benches only: given to another, it is a mistake, not a no-op
    (before the bench runs: a --json path that cannot be written would lose a long run)."""
    random_model = args.op == "generate" and (args.device != "cpu" or args.shape is not None)
    where = {  # flag -> (does this bench read it?, the benches that do)
        "nproc": (args.op in ("allreduce", "tp"), "allreduce and tp"),
        "model": (args.op == "serve" or (args.op == "generate" and not random_model), "serve and generate"),
        "device": (args.op == "generate", "generate"),
        "shape": (args.op == "generate", "generate"),
        "batch": (random_model, "generate with --device / --shape"),
        "passes": (args.op == "generate" and not random_model, "generate without --device / --shape"),
        "peers": (args.op == "generate" and not random_model, "generate without --device / --shape"),
        "quant": (args.op == "serve", "serve"),
        "requests": (args.op == "serve", "serve"),
        "output_tokens": (args.op == "serve", "serve"),
        "prompt_tokens": (args.op == "serve" or random_model, "serve and generate with --device / --shape"),
        "json": (args.op in ("gpu", "serve") or random_model, "serve, gpu and generate with --device / --shape"),
        "sections": (args.op == "gpu", "gpu"),
    }
    defaults = {"device": "cpu", "peers": False}  # the others default to None: given or not
    for name, (reads, benches) in where.items():
        if getattr(args, name) != defaults.get(name) and not reads:
            parser.error(f"--{name.replace('_', '-')} applies to bench {benches}, not to bench {args.op}")
    args.nproc = 2 if args.nproc is None else args.nproc
    args.passes = 1 if args.passes is None else args.passes
    for name in ("batch", "prompt_tokens", "passes"):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.sections is not None:
        from .bench.gpu import EXTRA_SECTIONS, SECTIONS

        if not _sections(args.sections) or set(_sections(args.sections)) - set(SECTIONS + EXTRA_SECTIONS):
            parser.error(f"--sections: expected a comma-separated list of {', '.join(SECTIONS + EXTRA_SECTIONS)}, "
                         f"got {args.sections!r}")  # fmt: skip
    if args.json is not None:
        why = _unwritable(Path(args.json))
        if why:
            parser.error(f"--json {args.json}: cannot write there ({why})")


def _sections(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _unwritable(path: Path) -> str | None:
    """Why ``path`` could not be written (folders made on the way), or None; nothing is made."""
    if path.is_dir():
        return "it is a folder"
    if path.exists():
        return None if os.access(path, os.W_OK) else "the file is not writable"
    folder = path.parent
    while not folder.exists():  # the nearest existing folder must take the new ones
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"


def _bench(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .bench import limits

    if args.op == "limits":
        limits.run()
        return 0
    if args.op == "gpu":
        from .bench import gpu

        sections = gpu.SECTIONS if args.sections is None else _sections(args.sections)
        return gpu.run(quick=args.quick, json_path=args.json, sections=sections)
    if args.op == "tp":
        from .bench import tp

        tp.run(nproc=args.nproc, rounds=args.rounds, quick=args.quick)
        return 0
    if args.op == "generate" and (args.device != "cpu" or args.shape):
        from .bench import random_generate

        return random_generate.run(device=args.device, shape=args.shape or "llama3-8b", batch=args.batch,
                                   prompt_tokens=args.prompt_tokens, quick=args.quick, json_path=args.json)  # fmt: skip
    if args.op == "generate":
        from .bench import generate

        return generate.run(model=args.model, quick=args.quick, rounds=min(args.rounds, 3), peers=args.peers,
                            passes=args.passes)  # fmt: skip
    if args.op == "serve":
        from .bench import serve

        return serve.run(model=args.model, quant=args.quant, threads=args.threads, requests=args.requests,
                         prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, json_path=args.json,
                         quick=args.quick)  # fmt: skip
    if args.op == "allreduce":
        from .bench import allreduce

        allreduce.run(nproc=args.nproc, sizes=allreduce.QUICK_SIZES if args.quick else allreduce.SIZES,
                      rounds=min(args.rounds, 5))  # fmt: skip
        return 0
    lim = limits.run()
    if args.op == "rotary_embedding":
        from .bench import rotary

        rotary.run(rounds=args.rounds, lim=lim)
        return 0
    if args.op == "silu_mul":
        from .bench import silu_mul

        silu_mul.run(rounds=args.rounds, lim=lim)
        return 0
    if args.op == "int8":
        from .bench import int8

        int8.run(rows=int8.ROWS[:2] if args.quick else int8.ROWS, rounds=args.rounds, lim=lim)
        int8.run_gemm(kns=int8.GEMM_KN[:2] if args.quick else int8.GEMM_KN, rounds=args.rounds, lim=lim)
        int8.run_weight_only(kns=int8.GEMM_KN[:2] if args.quick else int8.GEMM_KN, rounds=args.rounds, lim=lim)
        int8.run_linear(kns=int8.GEMM_KN[:2] if args.quick else int8.GEMM_KN, rounds=args.rounds, lim=lim)
        return 0
    if args.op == "linear":
        from .bench import linear

        linear.run(ms=linear.QUICK_MS if args.quick else linear.MS,
                   configs=linear.QUICK_CONFIGS if args.quick else tuple(linear.CONFIGS), rounds=args.rounds, lim=lim)
        linear.run_prefill(ms=linear.QUICK_PREFILL_MS if args.quick else linear.PREFILL_MS, rounds=args.rounds, lim=lim)
        return 0
    if args.op == "attention":
        from .bench import attention

        attention.run(rounds=args.rounds, lim=lim, quick=args.quick)
        return 0
    from .bench import norms

    names = tuple(norms.FAMILIES) if args.op == "norms" else (args.op,)
    shapes = norms.SHAPES if not args.quick else norms.SHAPES[:3]
    norms.run(names, shapes=shapes, rounds=args.rounds, lim=lim)
    return 0


def _add_generate_parser(sub) -> None:
    def engine_args(p):
        p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
        p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
        p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: fp32 on cpu, bf16 on cuda")
        p.add_argument("--quant", default="none", choices=("none", "w8a16", "w8a8"))
        p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="cuda: share of the GPU's memory the weights and the KV cache may fill")
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (run under torchrun)")
        p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
        p.add_argument("--no-weight-cache", dest="weight_cache", action="store_false", default=None,
                       help="convert a GGUF's weights on every load instead of caching them")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--max-model-len", type=int, default=None,
                       help="context limit in tokens (default: the model's)")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")

    gen = sub.add_parser("generate", help="generate text for one or more prompts (streamed to stdout)")
    gen.add_argument("prompts", nargs="*", help="prompts (default: a short demo prompt)")
    engine_args(gen)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    chat = sub.add_parser("chat", help="interactive chat with the chat template (Ctrl-D or Ctrl-C to quit; "
                          "Ctrl-C during an answer stops it)")
    engine_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")


def _add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with metrics (needs the serve extra: "
                       "pip install 'ringfuse[serve]')")  # fmt: skip
    p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--quant", default="none", choices=("none", "w8a16", "w8a8"))
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="cuda: share of the GPU's memory the weights and the KV cache may fill")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the engine (default: torch's)")
    p.add_argument("--no-weight-cache", dest="weight_cache", action="store_false", default=None,
                   help="convert a GGUF's weights on every load instead of caching them")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens (default: the model's)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: 8)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache capacity in tokens (default: max-batch full contexts, at most 65536)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one; default: 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as 'model' (default: --model as given, or SmolLM2-135M-Instruct)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="sequences that may wait for a batch slot; past that, requests get 429 (default: 64)")
    p.add_argument("--api-key", default=os.environ.get("RINGFUSE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on the API routes (default: $RINGFUSE_API_KEY; "
                   "/health, /ready and /metrics stay open)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="larger request bodies get 413 (default: 4 MiB)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level; debug also logs every request")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks: torchrun --nproc-per-node N -m ringfuse serve --tp N (rank 0 serves)")
    p.add_argument("--tp-timeout", type=float, default=60.0,
                   help="seconds a rank waits for another before it calls it dead (default: 60)")
    rep = p.add_argument_group("replicas", "N servers behind sglang-router (pip install 'ringfuse[serve]')")
    rep.add_argument("--replicas", type=int, default=None,
                     help="start N servers on free ports of 127.0.0.1 (each with --threads cores // N unless "
                     "given) and sglang-router in front of them on --host/--port")
    rep.add_argument("--policy", default=None, choices=("power_of_two", "cache_aware", "round_robin"),
                     help="the router's choice of replica (default: power_of_two, the less loaded of two; "
                     "round_robin for one replica)")
    rep.add_argument("--router-metrics-port", type=int, default=None,
                     help="port of the router's Prometheus metrics on 127.0.0.1 (default: a free one)")
    return p


def _check_tp(args, parser) -> None:
    """--tp N needs torchrun with N processes, and torchrun needs --tp."""
    if args.tp is not None and args.tp < 1:
        parser.error(f"--tp must be >= 1, got {args.tp}")
    if not 0.1 <= args.tp_timeout <= 86400:  # NaN fails this too
        parser.error(f"--tp-timeout must be in [0.1, 86400] seconds, got {args.tp_timeout}")
    tp, world = args.tp or 1, os.environ.get("WORLD_SIZE", "1")  # torchrun's
    world = int(world) if world.isdigit() else 1
    if tp > 1 and args.replicas is not None:
        parser.error("--tp and --replicas together are not supported: serve one tensor-parallel engine (torchrun "
                     "... ringfuse serve --tp N) or --replicas N single-rank ones")  # fmt: skip
    if tp > 1 and "WORLD_SIZE" not in os.environ:
        parser.error(f"--tp {tp} needs one process per rank: torchrun --nproc-per-node {tp} -m ringfuse serve "
                     f"--tp {tp} ...")  # fmt: skip
    if world != tp:
        parser.error(f"torchrun started {world} processes (WORLD_SIZE={world}) but --tp is {tp}: give --tp {world} "
                     "to serve one tensor-parallel engine over them")  # fmt: skip


def _serve(args, parser) -> int:
    from . import serve

    missing = serve.missing_dependencies()
    if missing:
        print(f"ringfuse serve: error: the server needs the serve extra, which is not installed (missing: "
              f"{', '.join(missing)}). Install it with: {serve.INSTALL_HINT}", file=sys.stderr)  # fmt: skip
        return 2
    for name in ("threads", "max_model_len", "max_batch", "kv_cache_tokens", "max_waiting", "max_body_bytes"):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model {args.model}: no such file or folder")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key must not be blank")
    if args.api_key is not None and not (args.api_key.isascii() and args.api_key.isprintable()):
        parser.error("--api-key must be printable ASCII (HTTP clients send the header as ASCII; another key "
                     "could never match)")
    _check_tp(args, parser)
    if args.replicas is None:
        for name in ("policy", "router_metrics_port"):
            if getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} needs --replicas")
        from .serve import server

        return server.run(args)
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {args.replicas}")
    if args.router_metrics_port is not None and not 1 <= args.router_metrics_port <= 65535:
        parser.error(f"--router-metrics-port must be in [1, 65535], got {args.router_metrics_port}")
    if args.replicas == 1 and args.policy == "power_of_two":
        parser.error("--policy power_of_two needs --replicas >= 2 (it picks the less loaded of two replicas)")
    args.policy = args.policy or ("power_of_two" if args.replicas > 1 else "round_robin")
    from .serve import replicas

    return replicas.run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ringfuse", description="ringfuse: fused kernels for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CPU features, backends built, threads")
    bench = sub.add_parser("bench", help="benchmark an op vs its torch baseline, in the same run")
    bench.add_argument("op", choices=BENCHES, help="what to bench (rms_norm covers rms_norm and add_rms_norm)")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    bench.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    bench.add_argument("--quick", action="store_true", help="skip the largest shapes")
    bench.add_argument("--nproc", type=int, default=None, help="processes for the allreduce and tp benches (default: 2)")
    bench.add_argument("--isa", default=None, choices=("auto", "amx", "avx512vnni", "avx2", "scalar"),
                       help="CPU kernel path (default: the best this CPU has; sets RINGFUSE_ISA for child processes)")
    bench.add_argument("--model", default=None, help="generate bench: model (default: SmolLM2-135M-Instruct)")
    bench.add_argument("--device", default="cpu",
                       help="generate bench: cuda (or cpu with --shape) runs a random-weight model of --shape against "
                       "HF eager on that device")
    bench.add_argument("--shape", default=None, help="generate bench: llama3-8b (default with --device cuda), "
                       "smollm2-135m or tiny")
    bench.add_argument("--batch", type=int, default=None,
                       help="generate bench with --device/--shape: the throughput batch (default: 64 on cuda, 8 on cpu)")
    bench.add_argument("--passes", type=int, default=None,
                       help="generate bench: interleaved passes over all engines, medians reported (default: 1)")
    bench.add_argument("--peers", action="store_true",
                       help="generate bench: also time CTranslate2 and llama.cpp in the same run (the peer "
                       "harness in ../shared/peers or $RINGFUSE_PEERS_DIR)")
    bench.add_argument("--quant", default=None, choices=("none", "w8a16", "w8a8"),
                       help="serve bench: ringfuse's weight quantization (default: w8a16)")
    bench.add_argument("--requests", type=int, default=None,
                       help="serve bench: GuideLLM requests per concurrency level (default: 32, --quick 16)")
    bench.add_argument("--prompt-tokens", type=int, default=None,
                       help="serve bench: prompt length (default: 128); generate bench with --device/--shape: of the "
                       "throughput batch (default: 512 on cuda, 64 on cpu)")
    bench.add_argument("--output-tokens", type=int, default=None,
                       help="serve bench: new tokens per request (default: 64, --quick 32)")
    bench.add_argument("--sections", default=None, metavar="LIST",
                       help="gpu bench: comma-separated sections (default: norms,activations,prefill,decode,int8,host; "
                       "tune: the decode tile sweep)")
    bench.add_argument("--json", default=None, metavar="PATH",
                       help="serve bench: where the JSON goes; the PNG plot goes beside it (default: under "
                       "$RINGFUSE_CACHE/bench); gpu bench: every row as JSON")
    _add_generate_parser(sub)
    serve_parser = _add_serve_parser(sub)
    import signal

    import ringfuse

    try:
        if signal.getsignal(signal.SIGINT) is ringfuse._interrupted:  # the package's start-up handler
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt again
        args = parser.parse_args(argv)
        return _run(args, parser, serve_parser)
    except KeyboardInterrupt:  # the commands handle it where they can go on; anywhere else, end here
        print("ringfuse: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # `ringfuse generate ... | head -1`: the reader left; stop quietly, and point stdout at
        # /dev/null so that the interpreter's last flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, as a shell reports a command that SIGPIPE ended


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (a BrokenPipeError from elsewhere, a
    socket or a child's pipe, is a real error)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def _run(args, parser, serve_parser) -> int:
    if args.command == "serve":
        return _serve(args, serve_parser)
    if args.command in ("generate", "chat"):
        from . import cli_generate

        return cli_generate.run(args)
    if args.command == "info":
        _print_info()
        return 0
    cap = 8 * (os.cpu_count() or 1)  # as LLM(threads=...): 1000 threads on 2 cores ran 500x slower
    if args.threads is not None and not 1 <= args.threads <= cap:
        parser.error(f"--threads must be in [1, {cap}] (8x this machine's cores), got {args.threads}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.isa is not None:
        from . import _C

        try:
            _C.set_isa(args.isa)
        except ValueError as e:
            parser.error(f"--isa {args.isa}: {e}")
        os.environ["RINGFUSE_ISA"] = args.isa  # the benches' child processes (engines, ranks)
    _check_bench_flags(args, parser)
    if args.op == "serve":  # flag errors before servers start
        from .bench import serve

        try:
            serve.check_settings(args.requests, args.prompt_tokens, args.output_tokens)
        except ValueError as e:
            parser.error(str(e))
    if args.op in ("allreduce", "tp"):  # before the benches start (processes, minutes of timing)
        from .bench import allreduce, tp

        try:
            if args.op == "allreduce":
                allreduce.check_nproc(args.nproc)
            else:
                tp.check_nproc(args.nproc, args.quick)
        except ValueError as e:
            parser.error(str(e))
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
