"""kernels/compile_check.py gives the same verdict on every host: each compile is hermetic
(codegen-affecting variables unset, knobs at their defaults, a private empty Triton cache,
the ptxas bundled with triton), so an environment that would change the PTX, the cubin or
the readings changes nothing. Measured: the pipeline itself is host-independent (same PTX
hash and byte-identical cubins under QEMU with an AVX2-only EPYC-Rome CPU as natively on
AVX-512; see the module docstring)."""

from __future__ import annotations

import os
import stat

from ringfuse.kernels import compile_check

from .triton_helpers import compile_in_child

# a small kernel whose PTX the polluting variables below would change
JOB = {"module": "int8_gemm", "kernel": "_quantize_per_token_kernel", "constexprs": {"BLOCK": 256}, "arch": 80,
       "num_warps": 1, "attrs": [[0, [["tt.divisibility", 16]]], [2, [["tt.divisibility", 16]]],
                                 [3, [["tt.divisibility", 16]]]],
       "signature": {"q_ptr": "*i8", "q_stride": "i32", "scale_ptr": "*fp32", "x_ptr": "*bf16", "x_stride": "i32",
                     "K": "i32", "err_ptr": "*i32", "BLOCK": "constexpr"}}  # fmt: skip
READINGS = ("name", "n_regs", "local_bytes", "budget_local_bytes", "cubin_identical", "shared", "ptx_sha256", "ptxas")


def test_environment_changes_nothing(tmp_path):
    fake_ptxas = tmp_path / "ptxas"  # another CUDA's ptxas, as TRITON_PTXAS_PATH may name one
    fake_ptxas.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Cuda compilation tools, release 12.9, V12.9.1" '
                          "&& exit 0\nexit 1\n")
    fake_ptxas.chmod(fake_ptxas.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    polluted = {**base, "TRITON_PTXAS_PATH": str(fake_ptxas), "TRITON_CUOBJDUMP_PATH": str(fake_ptxas),
                "PTXAS_OPTIONS": "--maxrregcount=16", "TRITON_DEFAULT_FP_FUSION": "0", "DISABLE_LLVM_OPT": "1",
                "TRITON_CACHE_DIR": str(cache), "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_DEBUG": "1",
                "TRITON_KERNEL_OVERRIDE": "1", "TRITON_OVERRIDE_DIR": str(tmp_path / "override")}  # fmt: skip
    [clean] = compile_in_child(compile_check.__name__, [JOB])
    [dirty] = compile_in_child(compile_check.__name__, [JOB], env=polluted)
    assert {k: dirty[k] for k in READINGS} == {k: clean[k] for k in READINGS}
    assert "backends/nvidia/bin/ptxas" in clean["ptxas"] and clean["cubin_identical"]
    assert not cache.exists() or not any(cache.iterdir())  # the private cache was used, and removed
