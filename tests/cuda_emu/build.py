"""Builds csrc/cuda's norm kernels for the CPU emulator (emu.h) and wraps them for ctypes.

The sources are compiled as they are, but for two textual rewrites the host compiler
needs: ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``::emu::launch(kernel, grid, block, smem, stream)(args)`` and each ``__shared__`` array
becomes static storage registered with ``emu::shared`` (poisoned before every block).
"""

from __future__ import annotations

import ctypes
import hashlib
import platform
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
SOURCES = ["rms_norm.cu", "layer_norm.cu"]
HEADERS = ["norm_common.cuh"]
CUDA_INCLUDE = [Path("/usr/local/cuda/include")]

_LAUNCH = re.compile(r"\b([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<([^;]*?)>>>\(")
_SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)((?:\[[^\]]*\])+)\s*;")


def rewrite(text: str) -> str:
    text = _LAUNCH.sub(r"::emu::launch(\1, \2)(", text)
    return _SHARED.sub(r"static \1 \2__emu\3; auto& \2 = ::emu::shared(\2__emu);", text)


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (for cuda_fp16.h, cuda_bf16.h, vector_types.h)."""
    for d in CUDA_INCLUDE:
        if (d / "cuda_fp16.h").is_file() and (d / "vector_types.h").is_file():
            return d
    nvcc = shutil.which("nvcc")
    if nvcc:
        d = Path(nvcc).resolve().parents[1] / "include"
        if (d / "cuda_fp16.h").is_file():
            return d
    return None


def missing_tools() -> str | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the emulator's fiber switch is x86-64 only, this is {platform.machine()}"
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include() is None:
        return "CUDA headers (cuda_fp16.h) not found"
    return None


def build(cache_dir: Path) -> Path:
    """Compiles the emulated norms into cache_dir (reused while the sources are unchanged)
    and returns the shared library's path."""
    inputs = [CSRC / "cuda" / n for n in SOURCES + HEADERS] + [CSRC / "common.h", CSRC / "cuda" / "norms.h"]
    inputs += [HERE / n for n in ("emu.h", "entry.cpp", "selftest.cu", "include/cuda_runtime.h")] + [Path(__file__)]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    lib = cache_dir / f"norms_emu_{digest}.so"
    if lib.is_file():
        return lib
    src = cache_dir / f"src_{digest}"
    (src / "cuda").mkdir(parents=True, exist_ok=True)
    for name in SOURCES + HEADERS:
        (src / "cuda" / name).write_text(rewrite((CSRC / "cuda" / name).read_text()))
    (src / "selftest.cu").write_text(rewrite((HERE / "selftest.cu").read_text()))
    tmp = lib.with_suffix(".tmp.so")
    cmd = ["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-w",
           "-I", str(src), "-I", str(CSRC), "-I", str(HERE / "include"), "-I", str(cuda_include()),
           "-x", "c++", *(str(src / "cuda" / n) for n in SOURCES), str(src / "selftest.cu"),
           "-x", "none", str(HERE / "entry.cpp"), "-o", str(tmp)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{proc.stderr[-8000:]}")
    tmp.rename(lib)
    return lib


class EmulatedNorms:
    """``rms_norm_cuda`` / ``layer_norm_cuda`` with ringfuse._C's signatures, running the
    CUDA kernels on the emulator over CPU memory (the pointers are CPU addresses)."""

    def __init__(self, lib_path: Path):
        self._lib = ctypes.CDLL(str(lib_path))
        u, i64, f64, i32, b = ctypes.c_size_t, ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_bool
        self._lib.emu_rms_norm.argtypes = [u, i64, u, i64, u, i64, u, i64, u, i64, i64, f64, i32, i32, i32, b, u,
                                           ctypes.c_char_p, i32]  # fmt: skip
        self._lib.emu_layer_norm.argtypes = [u, i64, u, i64, u, i64, u, i64, u, u, i64, i64, f64, i32, i32, i32, u,
                                             ctypes.c_char_p, i32]  # fmt: skip
        self._lib.emu_rms_norm.restype = self._lib.emu_layer_norm.restype = i32
        self._lib.emu_seed.argtypes = [ctypes.c_uint]
        self._lib.emu_selftest_block_sum.argtypes = [u, u, i32, ctypes.c_char_p, i32]

    def seed(self, seed: int) -> None:
        """Seeds the order in which the next launches interleave their warps."""
        self._lib.emu_seed(seed)

    @staticmethod
    def _call(fn, args):
        err = ctypes.create_string_buffer(4096)
        code = fn(*args, err, len(err))
        if code == 1:
            raise ValueError(err.value.decode())
        if code:
            raise RuntimeError(err.value.decode())

    def selftest_block_sum(self, x, out, mode: int) -> None:
        """selftest.cu's block_sum (mode 0 correct, 1 racy, 2 divergent barrier, 3 half-warp
        shuffle) on float32 CPU tensors x [64] and out [1]."""
        self._call(self._lib.emu_selftest_block_sum, (x.data_ptr(), out.data_ptr(), mode))

    def rms_norm_cuda(self, *args):
        self._call(self._lib.emu_rms_norm, args)

    def layer_norm_cuda(self, *args):
        self._call(self._lib.emu_layer_norm, args)
