"""``ringfuse`` command line: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import sys

BENCHES = ("limits", "rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "norms", "attention", "rotary_embedding", "int8", "allreduce", "tp")


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


def _bench(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .bench import limits

    if args.op == "limits":
        limits.run()
        return 0
    if args.op == "tp":
        from .bench import tp

        tp.run(nproc=args.nproc, rounds=args.rounds, quick=args.quick)
        return 0
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
    if args.op == "int8":
        from .bench import int8

        int8.run(rows=int8.ROWS[:2] if args.quick else int8.ROWS, rounds=args.rounds, lim=lim)
        int8.run_gemm(kns=int8.GEMM_KN[:2] if args.quick else int8.GEMM_KN, rounds=args.rounds, lim=lim)
        int8.run_weight_only(kns=int8.GEMM_KN[:2] if args.quick else int8.GEMM_KN, rounds=args.rounds, lim=lim)
        int8.run_linear(kns=int8.GEMM_KN[:2] if args.quick else int8.GEMM_KN, rounds=args.rounds, lim=lim)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ringfuse", description="ringfuse: fused kernels for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CPU features, backends built, threads")
    bench = sub.add_parser("bench", help="benchmark an op vs its torch baseline, in the same run")
    bench.add_argument("op", choices=BENCHES, help="what to bench (rms_norm covers rms_norm and add_rms_norm)")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    bench.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    bench.add_argument("--quick", action="store_true", help="skip the largest shapes")
    bench.add_argument("--nproc", type=int, default=2, help="processes for the allreduce and tp benches")
    args = parser.parse_args(argv)
    if args.command == "info":
        _print_info()
        return 0
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
