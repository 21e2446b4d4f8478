"""Machine limits measured by small loops in _C: copy bandwidth, fp32 FMA and int8 dot peaks.

Every bench prints its GB/s or GFLOP/s as a fraction of these, measured in the same run.
Copy bandwidth counts bytes read + bytes written (the STREAM convention), with AVX2 loads
and non-temporal stores as a tuned memcpy does beyond the caches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import _C
from ..ops import native
from .harness import print_table


@dataclass
class Limits:
    threads: int
    copy_gbs: float  # DRAM -> DRAM copy, read + write bytes per second / 1e9
    copy_l2_gbs: float  # a buffer that fits L2, for small benches
    read_gbs: float  # DRAM read-only stream (512 MiB, past the L3), bytes per second / 1e9
    fma_gflops: float  # fp32 FMA peak, GFLOP/s
    int8_gops: float  # int8 dot peak on the int8 GEMM's path (AVX-512 VNNI or AVX2), GOPS

    @property
    def isa(self) -> str:
        return _C.isa()


def _best_of(fn, repeats: int) -> float:
    """Best time of ``repeats`` calls: a limit is what the machine can do (as STREAM reports)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(nbytes: int, threads: int, repeats: int = 9) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)  # touched: no page faults in the timing
    native.probe_copy(dst, src, nbytes, threads)
    t = _best_of(lambda: native.probe_copy(dst, src, nbytes, threads), repeats)
    if not torch.equal(src[:4096], dst[:4096]):
        raise RuntimeError("probe_copy did not copy")
    return 2 * nbytes / t / 1e9


def read_bandwidth(nbytes: int, threads: int, repeats: int = 3) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.int32)  # the checksum is the number of int32
    if native.probe_read(src, nbytes, threads) != nbytes // 4:
        raise RuntimeError("probe_read did not read every byte")
    t = _best_of(lambda: native.probe_read(src, nbytes, threads), repeats)
    return nbytes / t / 1e9


def fma_peak(threads: int, iters: int = 2_000_000) -> float:
    flops = native.probe_fma_flops_per_iter(threads) * iters
    t = _best_of(lambda: native.probe_fma(iters, threads), 5)
    return flops / t / 1e9


def int8_peak(threads: int, iters: int = 1_000_000) -> float:
    ops = native.probe_int8_ops_per_iter(threads) * iters
    t = _best_of(lambda: native.probe_int8_dot(iters, threads), 5)
    return ops / t / 1e9


def int8_path() -> str:
    """The int8 GEMM's path as chosen now (``_C.set_isa`` / RINGFUSE_ISA included)."""
    return _C.build_info()["int8_gemm_isa"]


def torch_quantized_isa_note() -> str:
    """A note for tables with torch.ao's dynamic quantized Linear when ringfuse's int8 GEMM
    is held below what the CPU has: torch's quantized engine (fbgemm) picks its own ISA and
    does not follow ATEN_CPU_CAPABILITY, so there it is not a baseline of the same path."""
    if int8_path() == "avx2" and _C.build_info()["cpu_has_avx512_vnni"]:
        return (" torch.ao's dynamic quantized Linear picks its own ISA (fbgemm does not follow "
                "ATEN_CPU_CAPABILITY): on this AVX-512 VNNI CPU it runs VNNI code, not AVX2.")
    return ""


def attention_path() -> str:
    """The prefill attention's paths as chosen now: its products' vector width (AVX-512 at the
    "avx512vnni" level and above) and bf16's path ("amx" on CPUs with AMX tiles)."""
    info = _C.build_info()
    products = "avx512" if native.wide_kernels() else info["isa"]
    return f"products {products}, bf16 {info['attention_isa']}"


def wide_path() -> str:
    """The path of the kernels with 16-lane AVX-512 variants (linear and w8a16 at every M,
    silu_mul, the prefill attention's products and exponents, decode attention):
    "avx2+avx512" at the "avx512vnni" level and above, else the float path."""
    isa = _C.isa()
    return f"{isa}+avx512" if isa == "avx2" and native.wide_kernels() else isa


def cpu_path() -> str:
    """Which CPU kernels run: the float path (wide_path: with its 16-lane variants where they
    run), and the int8 GEMM's when it differs."""
    isa, int8 = _C.isa(), int8_path()
    return isa if int8 == isa else f"{wide_path()} (int8 GEMM {int8})"


def measure(threads: int | None = None) -> Limits:
    threads = threads or torch.get_num_threads()
    return Limits(
        threads=threads,
        copy_gbs=copy_bandwidth(64 << 20, threads),
        copy_l2_gbs=copy_bandwidth(256 << 10, threads, repeats=200),
        read_gbs=read_bandwidth(512 << 20, threads),
        fma_gflops=fma_peak(threads),
        int8_gops=int8_peak(threads),
    )


def run(threads: int | None = None) -> Limits:
    lim = measure(threads)
    print_table(
        f"ringfuse bench limits ({lim.threads} threads, {wide_path()} path)",
        ["limit", "loop", "value"],
        [
            ["copy bandwidth", "64 MiB -> 64 MiB, AVX2 + NT stores", f"{lim.copy_gbs:.1f} GB/s"],
            ["copy in L2", "256 KiB -> 256 KiB, memcpy", f"{lim.copy_l2_gbs:.1f} GB/s"],
            ["read from DRAM", "512 MiB, AVX2 loads, 4 sums per thread", f"{lim.read_gbs:.1f} GB/s"],
            ["fp32 FMA peak", f"10 chains x {native.probe_fma_lanes()} lanes per thread", f"{lim.fma_gflops:.1f} GFLOP/s"],
            ["int8 dot peak", f"12 chains per thread, {int8_path()} "
             f"({'vpdpbusd zmm' if int8_path() == 'avx512vnni' else 'vpmaddubsw + vpmaddwd + vpaddd'})",
             f"{lim.int8_gops:.0f} GOPS"],
        ],
        left=2,
        note="GB/s counts bytes read + written. Benches print their % of these, measured in the same run.",
    )
    return lim
