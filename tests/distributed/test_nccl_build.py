"""The NCCL transport (csrc/cuda/allreduce.cu) without a GPU.

1. ABI: csrc/cuda/nccl_api.h declares the NCCL symbols the transport dlopen()s. A small C++
   file that includes both the real nccl.h and nccl_api.h static_asserts that every enum
   value, the ncclUniqueId size and every function type agree; g++ is enough (nccl.h's CUDA
   includes come from the toolkit when one is found, else from minimal stubs). nccl.h comes
   from ``RINGFUSE_NCCL_INCLUDE`` (a directory holding nccl.h) or an installed
   ``nvidia-nccl-cu13`` wheel (``pip install 'ringfuse[cuda]'``); skipped without either.
   Without installing the 305 MB wheel:

       pip download --no-deps nvidia-nccl-cu13 -d /tmp/nccl
       unzip -q /tmp/nccl/nvidia_nccl_cu13-*.whl -d /tmp/nccl/unz
       RINGFUSE_NCCL_INCLUDE=/tmp/nccl/unz/nvidia/nccl/include \\
       RINGFUSE_NCCL_LIB=/tmp/nccl/unz/nvidia/nccl/lib/libnccl.so.2 \\
           pytest tests/distributed/test_nccl_build.py

2. The ring schedule (csrc/ring_schedule.h): tests/distributed/nccl_schedule_sim.cpp
   checks every rank's sends against its successor's receives, looks for races between the
   two streams, and runs the schedule (rendezvous semantics, random interleavings) against
   an independently computed fixed-order reduction, bit for bit.
3. The combine kernels: every (dtype, op) instantiated for sm_80 / sm_90, none spilling
   (tests/test_cuda_build.py checks spills in every .cu; this pins the kernel list).
4. The loader through _C (the CUDA build, no device): errors that name the cause; with
   libnccl.so.2 available (``RINGFUSE_NCCL_LIB`` or the wheel) the real library's version
   and a 128-byte unique id, and a communicator that fails cleanly without a device.
5. The Python layer's choices that need no device.
The GPU tests are in test_allreduce_nccl.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ..test_cuda_build import find_nvcc, parse_ptxas

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent


def find_gxx() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def find_nccl_include() -> Path | None:
    env = os.environ.get("RINGFUSE_NCCL_INCLUDE")
    if env:
        return Path(env) if (Path(env) / "nccl.h").is_file() else None
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(base) / "include" / "nccl.h").is_file():
            return Path(base) / "include"
    return None


def find_cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c) / "include"
    return None


# What nccl.h and nccl_api.h need from the CUDA headers, for machines without a toolkit.
CUDA_STUBS = {
    "cuda_runtime_api.h": "#pragma once\n#include <stddef.h>\n#define CUDART_VERSION 13000\n"
    "typedef struct CUstream_st* cudaStream_t;\ntypedef struct CUevent_st* cudaEvent_t;\n",
    "cuda_runtime.h": '#pragma once\n#include "cuda_runtime_api.h"\n',
    "cuda_fp16.h": "#pragma once\n",
    "cuda_bf16.h": "#pragma once\n",
    "cuda_fp8.h": "#pragma once\n",
}

ABI_CHECK = r"""
#include <nccl.h>

#include <type_traits>

#include "cuda/nccl_api.h"

namespace rn = ringfuse::nccl;

// our types -> nccl.h's, through pointers and function types
template <class T> struct Map { using type = T; };
template <> struct Map<rn::ncclResult_t> { using type = ::ncclResult_t; };
template <> struct Map<rn::ncclDataType_t> { using type = ::ncclDataType_t; };
template <> struct Map<rn::ncclComm_t> { using type = ::ncclComm_t; };
template <> struct Map<rn::ncclUniqueId> { using type = ::ncclUniqueId; };
template <class T> struct Map<T*> { using type = typename Map<T>::type*; };
template <class R, class... A> struct Map<R (*)(A...)> {
  using type = typename Map<R>::type (*)(typename Map<A>::type...);
};

#define SAME_FN(ours, theirs)                                                   \
  static_assert(std::is_same_v<Map<rn::ours>::type, decltype(&::theirs)>,      \
                #theirs ": nccl_api.h's " #ours " differs from nccl.h");
SAME_FN(GetVersionFn, ncclGetVersion)
SAME_FN(GetUniqueIdFn, ncclGetUniqueId)
SAME_FN(CommInitRankFn, ncclCommInitRank)
SAME_FN(CommDestroyFn, ncclCommDestroy)
SAME_FN(CommAbortFn, ncclCommAbort)
SAME_FN(CommGetAsyncErrorFn, ncclCommGetAsyncError)
SAME_FN(GetErrorStringFn, ncclGetErrorString)
SAME_FN(GetLastErrorFn, ncclGetLastError)
SAME_FN(SendFn, ncclSend)
SAME_FN(RecvFn, ncclRecv)
SAME_FN(GroupStartFn, ncclGroupStart)
SAME_FN(GroupEndFn, ncclGroupEnd)

#define SAME_VALUE(name) static_assert(int(rn::name) == int(::name), #name ": value differs from nccl.h");
SAME_VALUE(ncclSuccess) SAME_VALUE(ncclUnhandledCudaError) SAME_VALUE(ncclSystemError)
SAME_VALUE(ncclInternalError) SAME_VALUE(ncclInvalidArgument) SAME_VALUE(ncclInvalidUsage)
SAME_VALUE(ncclRemoteError) SAME_VALUE(ncclInProgress)
SAME_VALUE(ncclInt8) SAME_VALUE(ncclChar) SAME_VALUE(ncclUint8) SAME_VALUE(ncclInt32) SAME_VALUE(ncclInt)
SAME_VALUE(ncclUint32) SAME_VALUE(ncclInt64) SAME_VALUE(ncclUint64) SAME_VALUE(ncclFloat16) SAME_VALUE(ncclHalf)
SAME_VALUE(ncclFloat32) SAME_VALUE(ncclFloat) SAME_VALUE(ncclFloat64) SAME_VALUE(ncclDouble)
SAME_VALUE(ncclBfloat16) SAME_VALUE(ncclFloat8e4m3) SAME_VALUE(ncclFloat8e5m2) SAME_VALUE(ncclNumTypes)

static_assert(sizeof(rn::ncclResult_t) == sizeof(::ncclResult_t), "ncclResult_t size");
static_assert(std::is_same_v<std::underlying_type_t<rn::ncclResult_t>, std::underlying_type_t<::ncclResult_t>>,
              "ncclResult_t underlying type");
static_assert(sizeof(rn::ncclDataType_t) == sizeof(::ncclDataType_t), "ncclDataType_t size");
static_assert(std::is_same_v<std::underlying_type_t<rn::ncclDataType_t>, std::underlying_type_t<::ncclDataType_t>>,
              "ncclDataType_t underlying type");
static_assert(rn::kUniqueIdBytes == NCCL_UNIQUE_ID_BYTES, "NCCL_UNIQUE_ID_BYTES");
static_assert(sizeof(rn::ncclUniqueId) == sizeof(::ncclUniqueId), "ncclUniqueId size");
static_assert(alignof(rn::ncclUniqueId) == alignof(::ncclUniqueId), "ncclUniqueId alignment");
static_assert(rn::version_code(2, 8, 4) == NCCL_VERSION(2, 8, 4), "NCCL_VERSION, old scheme");
static_assert(rn::version_code(2, 32, 3) == NCCL_VERSION(2, 32, 3), "NCCL_VERSION");
static_assert(NCCL_VERSION_CODE >= rn::kMinVersion, "this nccl.h is older than the transport needs");

int main() { return 0; }
"""


def compile_abi_check(nccl_include: Path, cuda_include: Path, api_dir: Path = CSRC) -> subprocess.CompletedProcess:
    gxx = find_gxx()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "nccl_abi_check.cpp"
        # ncclTimeout (and with it ncclNumResults, a count nothing uses) came after NCCL 2.28:
        # compared where the real header has it (torch 2.11's cu130 wheels bring NCCL 2.28.9)
        newer = "ncclTimeout" in (nccl_include / "nccl.h").read_text()
        src.write_text(ABI_CHECK + ("SAME_VALUE(ncclTimeout) SAME_VALUE(ncclNumResults)\n" if newer else ""))
        cmd = [gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-I", str(api_dir), "-I", str(nccl_include),
               "-I", str(cuda_include), str(src)]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def nccl_include():
    if find_gxx() is None:
        pytest.skip("no g++")
    inc = find_nccl_include()
    if inc is None:
        pytest.skip("nccl.h not found: set RINGFUSE_NCCL_INCLUDE or pip install nvidia-nccl-cu13 (see the docstring)")
    return inc


@pytest.fixture(params=["toolkit", "stubs"])
def cuda_include(request, tmp_path):
    if request.param == "toolkit":
        inc = find_cuda_include()
        if inc is None:
            pytest.skip("no CUDA toolkit headers (the stub variant still runs)")
        return inc
    for name, text in CUDA_STUBS.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_nccl_api_h_matches_the_real_nccl_h(nccl_include, cuda_include):
    proc = compile_abi_check(nccl_include, cuda_include)
    assert proc.returncode == 0, f"nccl_api.h disagrees with {nccl_include}/nccl.h:\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize("mutation", [
    ("ncclRemoteError = 6", "ncclRemoteError = 7"),
    ("ncclBfloat16 = 9", "ncclBfloat16 = 10"),
    ("constexpr int kUniqueIdBytes = 128", "constexpr int kUniqueIdBytes = 64"),
    ("int peer, ncclComm_t comm,\n                                cudaStream_t stream);\nusing GroupStartFn",
     "long peer, ncclComm_t comm,\n                                cudaStream_t stream);\nusing GroupStartFn"),
], ids=["result value", "dtype value", "unique id size", "recv signature"])  # fmt: skip
def test_the_abi_check_catches_a_wrong_declaration(nccl_include, tmp_path, mutation):
    """The check fails when nccl_api.h is wrong (here: edited copies of it)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in CUDA_STUBS.items():
        (stubs / name).write_text(text)
    api = (CSRC / "cuda" / "nccl_api.h").read_text()
    old, new = mutation
    assert old in api, old
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "nccl_api.h").write_text(api.replace(old, new))
    proc = compile_abi_check(nccl_include, stubs, api_dir=tmp_path)
    assert proc.returncode != 0 and "static assertion failed" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# 2. The schedule


def test_ring_schedule_matches_has_no_races_and_gives_the_fixed_order_result(tmp_path):
    gxx = find_gxx()
    if gxx is None:
        pytest.skip("no g++")
    exe = tmp_path / "nccl_schedule_sim"
    cmd = [gxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC),
           str(HERE / "nccl_schedule_sim.cpp"), "-o", str(exe)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout[-3000:] + run.stderr[-3000:]
    assert int(run.stdout.split()[1]) > 1000  # configurations checked


# ---------------------------------------------------------------------------------------
# 3. The combine kernels

COMBINE_KERNELS = {(dtype, op) for dtype in ("F32", "F16", "BF16", "Int<int>", "Int<long>") for op in (0, 2, 3)}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_combine_kernel_is_built_without_spills(arch, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt not found (binutils)")
    cmd = [nvcc, "-std=c++17", "-O3", "-c", f"-arch={arch}", "-Xptxas", "-v", "-I", str(CSRC),
           str(CSRC / "cuda" / "allreduce.cu"), "-o", str(tmp_path / "allreduce.o")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    funcs = parse_ptxas(log)
    found = set()
    for name, f in funcs.items():
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        m = re.search(r"ring_combine_kernel<(?:ringfuse::ring::|ringfuse::cuda::\(anonymous namespace\)::)?"
                      r"(F32|F16|BF16|Int<int>|Int<long>), (\d)>", demangled)  # fmt: skip
        if m:
            found.add((m.group(1), int(m.group(2))))
            assert f["spill_stores"] == 0 and f["spill_loads"] == 0, (arch, demangled, f)
            assert f["registers"] <= 64, (arch, demangled, f)  # full occupancy at 256 threads
    assert found == COMBINE_KERNELS, sorted(COMBINE_KERNELS - found)


# ---------------------------------------------------------------------------------------
# 4. The loader, through _C (CUDA build, no device needed)


def nccl_C():
    from ringfuse import _C

    if not hasattr(_C, "nccl_ring_run"):
        pytest.skip("ringfuse._C was built without CUDA (no NCCL transport)")
    return _C


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Fresh interpreter: nccl_load keeps the first library it loaded for the process."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip


def test_nccl_load_errors_name_the_cause(tmp_path):
    nccl_C()
    code = f"""
from ringfuse import _C
def err(f, *a):
    try:
        f(*a)
    except ValueError as e:
        return str(e)
    return "no error"
print(err(_C.nccl_unique_id))
print(err(_C.nccl_comm_open, b"x" * 128, 0, 2, 0))
print(err(_C.nccl_load, "{tmp_path}/missing/libnccl.so.2"))
print(err(_C.nccl_load, "libm.so.6"))
print(err(_C.nccl_load, ""))
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "libnccl.so.2 is not loaded (nccl_load first)" in lines[0]
    assert "libnccl.so.2 is not loaded" in lines[1]
    assert "cannot load" in lines[2] and "No such file or directory" in lines[2]  # dlerror's text
    assert "has no symbol ncclGetVersion" in lines[3]
    assert "library path is empty" in lines[4]


def test_the_real_libnccl_loads_and_fails_cleanly_without_a_device():
    nccl_C()
    from ringfuse.distributed.allreduce import nccl_library_path

    path = nccl_library_path()
    if not os.path.isabs(path):
        pytest.skip("libnccl.so.2 not found: set RINGFUSE_NCCL_LIB or pip install 'ringfuse[cuda]'")
    code = f"""
import torch
from ringfuse import _C
v = _C.nccl_load({path!r})
print(v)
print(_C.nccl_load("/no/such/lib.so"))  # the first load stays
uid = _C.nccl_unique_id()
print(type(uid).__name__, len(uid), uid != _C.nccl_unique_id())
for args in ((uid, 0, 2, 0, 1000), (uid, 0, 2, 0, 4096, 0), (uid, 2, 2, 0), (b"short", 0, 2, 0)):
    try:
        _C.nccl_comm_open(*args)
    except ValueError as e:
        print(str(e))
if not torch.cuda.is_available():
    try:
        _C.nccl_comm_open(uid, 0, 2, 0)
    except ValueError as e:
        print("no device:", e)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    version = int(out[0])
    assert version >= 21000 and int(out[1]) == version
    assert out[2] == "bytes 128 True"
    assert "piece_bytes must be a multiple of 256" in out[3]
    assert "timeout_ms must be > 0" in out[4]
    assert "rank must be in [0, world)" in out[5]
    assert "unique_id must have 128 bytes, got 5" in out[6]
    if len(out) > 7:
        assert out[7].startswith("no device: ringfuse._C: nccl ring: cudaSetDevice(0) failed: cuda"), out[7]


def test_ring_run_rejects_bad_handles_before_anything():
    C = nccl_C()
    with pytest.raises(ValueError, match="nccl ring: invalid or closed handle"):
        C.nccl_ring_run(12345, 0, 0, 0, 0, 0, 0, 1000)
    with pytest.raises(ValueError, match="nccl ring: invalid or already closed handle"):
        C.nccl_comm_close(12345)
    with pytest.raises(ValueError, match="nccl ring: invalid or closed handle"):
        C.nccl_last_error(12345)


# ---------------------------------------------------------------------------------------
# 5. The Python layer's choices that need no device


def test_backends_and_errors_without_a_device():
    import torch

    from ringfuse import distributed as rdist
    from ringfuse.distributed import allreduce as ar

    assert "nccl" in ar.BACKENDS
    with pytest.raises(ValueError, match="backend 'nccl' needs CUDA tensors, got a CPU tensor"):
        rdist.all_reduce(torch.ones(3), backend="nccl")
    with pytest.raises(ValueError, match="backend 'nccl' needs a CUDA device"):
        rdist.get_communicator(None, "nccl")
    with pytest.raises(ValueError, match="backend 'shm' needs CPU tensors"):
        rdist.get_communicator(None, "shm", "cuda:0")
    where = "CPU or a CUDA device" if ar.nccl_built() else "CPU"
    with pytest.raises(ValueError, match=f"tensor must be on {where}, got meta"):
        rdist.all_reduce(torch.ones(2, device="meta"))


def test_nccl_library_path_prefers_the_env_then_the_wheel(tmp_path, monkeypatch):
    from ringfuse.distributed.allreduce import nccl_library_path

    monkeypatch.setenv("RINGFUSE_NCCL_LIB", "/x/libnccl.so.2")
    assert nccl_library_path() == "/x/libnccl.so.2"
    monkeypatch.delenv("RINGFUSE_NCCL_LIB")
    # a fake nvidia-nccl wheel (namespace package nvidia, package nvidia.nccl)
    lib = tmp_path / "nvidia" / "nccl" / "lib"
    lib.mkdir(parents=True)
    (lib / "libnccl.so.2").write_bytes(b"")
    for name in ("nvidia.nccl", "nvidia"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert nccl_library_path() == str(lib / "libnccl.so.2")


def test_info_shows_the_nccl_transport():
    from ringfuse import _C
    from ringfuse.cli import info

    line = info()["distributed transports"]
    assert ("nccl (built" in line) == hasattr(_C, "nccl_ring_run"), line
    assert "nccl for CUDA tensors" in info()["distributed auto picks"]


def test_nccl_transport_control_plane_over_the_store():
    """NcclTransport without NCCL (_C's entries faked in the ranks): rank 0's unique id
    reaches every rank with its device and piece size; handshakes return every rank's call,
    a mismatch shows in all ranks' answers, and the store keeps a bounded number of keys."""
    from .harness import run_ranks, values
    from . import workers_nccl

    calls, world = 40, 3
    res = values(run_ranks(workers_nccl.fake_transport_handshakes, world, calls, 17))
    uids = {opened[0] for opened, _, _, _ in res}
    assert len(uids) == 1 and len(uids.pop()) == 128
    for rank, (opened, answers, left, closed) in enumerate(res):
        assert opened[1:] == (rank, world, rank, 8192, 10000)
        for i, everyone in enumerate(answers):
            want = [[0, 100 + i + (1 if q == 1 and i == 17 else 0), 0, 0] for q in range(world)]
            assert everyone == want, (rank, i, everyone)
        assert left <= 3 * world, left  # calls n-1 and n (and a peer's n-2 not yet deleted)
        assert closed == (1, False)


def test_nccl_transport_handshake_times_out_on_a_dead_peer():
    from .harness import run_ranks
    from . import workers_nccl

    timeout_s = 2.0
    res = run_ranks(workers_nccl.fake_transport_dead_peer, 3, timeout_s, allow_missing=(2,), timeout_s=60)
    for rank in (0, 1):
        status, value = res[rank]
        assert status == "ok", value
        kind, elapsed, message, closed = value
        assert kind == "RingTimeoutError" and elapsed < timeout_s + 5, value
        assert f"on rank {rank}" in message
        assert closed == (1, True)  # a failed transport aborts instead of NCCL's collective destroy
