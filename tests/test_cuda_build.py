"""The CUDA C++ kernels in csrc/cuda.

1. Without a GPU: every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 and ptxas
   (-v) reports no register spills in any function. Skipped when no nvcc is installed.
2. Numerics, each test twice: on a GPU (``[cuda-...]``, marked gpu, skipped without a
   device) the bound entries ``ringfuse._C.rms_norm_cuda`` / ``ringfuse._C.layer_norm_cuda``
   called with raw pointers on CUDA tensors; on the CPU emulator of tests/cuda_emu
   (``[emu-...]``, any host with g++ and the CUDA headers) the same sources compiled by g++,
   with pointers into CPU tensors. Both against the fp64 reference with ARCHITECTURE.md's
   tolerance rule (error <= 2x torch's own same-dtype error vs the reference), computed on
   the CPU.
3. The C++ boundary checks (ValueError), which need the CUDA build but no device.

ringfuse is imported inside the tests only: the compile check runs without a built package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]


# ---------------------------------------------------------------------------------------
# 1. nvcc compile check
# ---------------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() and os.access(default, os.X_OK) else None


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict[str, dict]:
    """ptxas -v output -> {function: {"arch", "registers", "stack", "spill_stores",
    "spill_loads"}} for every function with a properties line (entry kernels and any
    device function ptxas kept out of line)."""
    funcs: dict[str, dict] = {}
    current = None
    arch = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            arch = m.group(2)
            current = funcs.setdefault(m.group(1), {"arch": arch})
        elif m := _PROPS.search(line):
            current = funcs.setdefault(m.group(1), {"arch": arch})
        elif (m := _SPILL.search(line)) and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif (m := _REGS.search(line)) and current is not None:
            current["registers"] = int(m.group(1))
    return funcs


def test_parse_ptxas_finds_spills():
    text = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 384 bytes cmem[0]
"""
    funcs = parse_ptxas(text)
    assert funcs["_Z3fooPf"] == {"arch": "sm_90", "stack": 8, "spill_stores": 4, "spill_loads": 12, "registers": 255}
    assert funcs["_Z3barPf"]["spill_stores"] == 0 and funcs["_Z3barPf"]["registers"] == 32


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_without_spills(source, arch):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin")
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / (source.stem + ".o")
        cmd = [nvcc, "-std=c++17", "-O3", "-c", f"-arch={arch}", "-Xptxas", "-v",
               "-I", str(ROOT / "csrc"), str(source), "-o", str(obj)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"nvcc failed ({proc.returncode}):\n{' '.join(cmd)}\n{log[-8000:]}"
        assert obj.is_file()
    funcs = parse_ptxas(log)
    assert funcs, f"no function info parsed from ptxas -v output:\n{log[-4000:]}"
    missing = [name for name, f in funcs.items() if "spill_stores" not in f]
    assert not missing, f"no spill line for {missing}:\n{log[-4000:]}"
    wrong_arch = {name: f["arch"] for name, f in funcs.items() if f["arch"] not in (None, arch)}
    assert not wrong_arch, wrong_arch
    spills = {name: f for name, f in funcs.items() if f["spill_stores"] or f["spill_loads"]}
    assert not spills, f"{source.name} {arch}: register spills in {spills}"


# ---------------------------------------------------------------------------------------
# Shared by 2 and 3: raw calls of the bound CUDA entries
# ---------------------------------------------------------------------------------------

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common.h
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cuda_C():
    """ringfuse._C with its CUDA entries, or skip."""
    from ringfuse import _C

    if not hasattr(_C, "rms_norm_cuda"):
        pytest.skip("ringfuse._C was built without CUDA kernels")
    return _C


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stride(t):
    return 0 if t is None else t.stride(0)


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def call_rms(C, out, x, weight, eps, residual=None, residual_out=None, llama=False):
    """out[, residual_out] <- rms_norm(x[, + residual]) through C.rms_norm_cuda."""
    rows, hidden = x.shape
    C.rms_norm_cuda(
        out.data_ptr(), out.stride(0), _ptr(residual_out), _stride(residual_out),
        x.data_ptr(), x.stride(0), _ptr(residual), _stride(residual),
        _ptr(weight), rows, hidden, eps,
        DTYPE_CODE[x.dtype], DTYPE_CODE[(weight if weight is not None else x).dtype], DTYPE_CODE[out.dtype],
        llama, _stream(x),
    )  # fmt: skip


def call_ln(C, out, x, weight, bias, eps, residual=None, residual_out=None):
    """out[, residual_out] <- layer_norm(x[, + residual]) through C.layer_norm_cuda."""
    rows, hidden = x.shape
    param = weight if weight is not None else bias
    C.layer_norm_cuda(
        out.data_ptr(), out.stride(0), _ptr(residual_out), _stride(residual_out),
        x.data_ptr(), x.stride(0), _ptr(residual), _stride(residual),
        _ptr(weight), _ptr(bias), rows, hidden, eps,
        DTYPE_CODE[x.dtype], DTYPE_CODE[(param if param is not None else x).dtype], DTYPE_CODE[out.dtype],
        _stream(x),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# 2. Numerics on a GPU. The check_* helpers take the module holding the entries and a
# device, so they are plain functions of their inputs.
# ---------------------------------------------------------------------------------------


def make_inputs(rows, hidden, dtype, device, seed=0, w_dtype=None, scale=1.0, offset=0.0):
    g = torch.Generator(device="cpu").manual_seed(seed + 7919 * hidden + rows)
    x = (torch.randn(rows, hidden, generator=g) * scale + offset).to(dtype).to(device)
    r = torch.randn(rows, hidden, generator=g).to(dtype).to(device)
    w = (torch.rand(hidden, generator=g) + 0.5).to(w_dtype or dtype).to(device)
    b = (torch.randn(hidden, generator=g) * 0.1).to(w_dtype or dtype).to(device)
    return x, r, w, b


def on_cpu(*tensors):
    """CPU copies (None stays None). The oracles (fp64 reference, torch's same-dtype budget,
    x + r) run on the CPU whatever device ran the kernel: they are then the same on a GPU,
    on the emulator and from one torch build to the next. (On the H200, 11 of these checks
    failed against budgets and NaN patterns computed by torch's CUDA kernels, a different
    computation from the CPU's; the emulator passes all of them against the CPU's.)"""
    return [None if t is None else t.cpu() for t in tensors]


def rms_budget(x, w, eps, r, llama, out_dtype):
    """torch's own computation giving out_dtype: the error budget of the tolerance rule."""
    from .ops.norm_reference import residual_sum, rms_torch

    if llama:  # HF order: round_x(s * rstd), then the weight multiply in promote(x, w)
        wf = w.float() if w is not None and out_dtype == torch.float32 else w
        return rms_torch(x, wf, eps, r, True).to(out_dtype)
    if out_dtype == x.dtype:
        return rms_torch(x, w, eps, r).to(out_dtype)
    # a float32 output from 16-bit x: torch's float32 computation on the same s
    s = residual_sum(x, r).float()
    return rms_torch(s, None if w is None else w.float(), eps)


def ln_budget(x, w, b, eps, r, out_dtype):
    from .ops.norm_reference import ln_torch, residual_sum

    if out_dtype == x.dtype:
        return ln_torch(x, w, b, eps, r).to(out_dtype)
    s = residual_sum(x, r).float()
    return ln_torch(s, None if w is None else w.float(), None if b is None else b.float(), eps)


def check_rms(C, device, dtype, rows, hidden, residual, *, llama=False, w_dtype=None, out_dtype=None,
              with_weight=True, eps=1e-6, x=None, seed=0):
    """One rms_norm_cuda call vs the fp64 reference; residual_out must equal torch's x + r."""
    from .ops.norm_reference import assert_within_tolerance, rms_ref64

    x0, r, w, _ = make_inputs(rows, hidden, dtype, device, seed, w_dtype)
    x = x0 if x is None else x
    r = r if residual else None
    w = w if with_weight else None
    out_dtype = out_dtype or dtype
    out = torch.full((rows, hidden), float("nan"), dtype=out_dtype, device=device)
    r_out = torch.full_like(x0, float("nan")) if residual else None
    call_rms(C, out, x, w, eps, r, r_out, llama)
    out, r_out, x, r, w = on_cpu(out, r_out, x, r, w)
    what = f"rms_norm {dtype} w={w_dtype or dtype} out={out_dtype} [{rows}, {hidden}] residual={residual} llama={llama}"
    if residual:
        assert torch.equal(r_out, x + r), what + ": residual_out != x + residual"
    assert_within_tolerance(out, rms_ref64(x, w, eps, r, llama), rms_budget(x, w, eps, r, llama, out_dtype),
                            what, rounding_dtype=dtype if llama else None)  # fmt: skip
    return out, r_out


def check_ln(C, device, dtype, rows, hidden, residual, *, w_dtype=None, out_dtype=None, with_weight=True,
             with_bias=True, eps=1e-5, x=None, seed=0, offset=0.0):
    """One layer_norm_cuda call vs the fp64 reference; residual_out must equal x + r."""
    from .ops.norm_reference import assert_within_tolerance, ln_ref64

    x0, r, w, b = make_inputs(rows, hidden, dtype, device, seed, w_dtype, offset=offset)
    x = x0 if x is None else x
    r = r if residual else None
    w = w if with_weight else None
    b = b if with_bias else None
    out_dtype = out_dtype or dtype
    out = torch.full((rows, hidden), float("nan"), dtype=out_dtype, device=device)
    r_out = torch.full_like(x0, float("nan")) if residual else None
    call_ln(C, out, x, w, b, eps, r, r_out)
    out, r_out, x, r, w, b = on_cpu(out, r_out, x, r, w, b)
    what = f"layer_norm {dtype} w={w_dtype or dtype} out={out_dtype} [{rows}, {hidden}] residual={residual}"
    if residual:
        assert torch.equal(r_out, x + r), what + ": residual_out != x + residual"
    assert_within_tolerance(out, ln_ref64(x, w, b, eps, r), ln_budget(x, w, b, eps, r, out_dtype), what)
    return out, r_out


def check_in_place(C, device, dtype, rows, hidden):
    """out = x and residual_out = residual (vLLM's fused_add_rms_norm): bitwise equal to the
    out-of-place call, for both ops, with and without a residual."""
    x, r, w, b = make_inputs(rows, hidden, dtype, device, seed=3)
    for op in ("rms", "ln"):
        for residual in (False, True):
            out = torch.empty_like(x)
            r_out = torch.empty_like(x) if residual else None
            xi, ri = x.clone(), (r.clone() if residual else None)
            rr = r if residual else None
            if op == "rms":
                call_rms(C, out, x, w, 1e-6, rr, r_out)
                call_rms(C, xi, xi, w, 1e-6, ri, ri)
            else:
                call_ln(C, out, x, w, b, 1e-5, rr, r_out)
                call_ln(C, xi, xi, w, b, 1e-5, ri, ri)
            assert torch.equal(xi, out), f"{op} in place {dtype} [{rows}, {hidden}] residual={residual}"
            if residual:
                assert torch.equal(ri, r_out), f"{op} in place residual_out {dtype} [{rows}, {hidden}]"


def check_strided(C, device, dtype, rows, hidden):
    """Row strides != hidden: a padded (aligned) view, a view at an odd offset (unaligned),
    for x, residual, out and residual_out."""
    from .ops.norm_reference import assert_within_tolerance, ln_ref64, rms_ref64

    x0, r0, w, b = make_inputs(rows, hidden, dtype, device, seed=5)
    x0c, r0c, wc, bc = on_cpu(x0, r0, w, b)
    for pad, start in ((8, 0), (8, 3), (1, 1)):
        def view(t, fill=0.0):
            big = torch.full((rows, hidden + pad), fill, dtype=t.dtype, device=device)
            big[:, start : start + hidden] = t
            return big, big[:, start : start + hidden]

        xb, x = view(x0)
        rb, r = view(r0)
        ob, out = view(torch.empty_like(x0), float("nan"))
        sb, s = view(torch.empty_like(x0), float("nan"))
        what = f"{dtype} [{rows}, {hidden}] pad={pad} start={start}"
        call_rms(C, out, x, w, 1e-6, r, s)
        assert torch.equal(s, x0 + r0), "rms residual_out " + what
        assert_within_tolerance(out.cpu(), rms_ref64(x0c, wc, 1e-6, r0c), rms_budget(x0c, wc, 1e-6, r0c, False, dtype),
                                "rms strided " + what)  # fmt: skip
        call_ln(C, out, x, w, b, 1e-5, r, s)
        assert torch.equal(s, x0 + r0), "ln residual_out " + what
        assert_within_tolerance(out.cpu(), ln_ref64(x0c, wc, bc, 1e-5, r0c), ln_budget(x0c, wc, bc, 1e-5, r0c, dtype),
                                "ln strided " + what)  # fmt: skip
        # the padding around each row is untouched
        for big, t in ((ob, out), (sb, s)):
            mask = torch.ones_like(big, dtype=torch.bool)
            mask[:, start : start + hidden] = False
            assert big[mask].isnan().all(), "write outside the rows " + what
        assert torch.equal(xb[:, start : start + hidden], x0) and torch.equal(rb[:, start : start + hidden], r0)


# 1, 7, 577: unaligned rows (scalar accesses); the powers of two fill every chunk slot of
# the register kernels; 64, 200 (several rows per block), 1000, 5000, 20000 leave idle
# slots in the last chunks, which must not count in the sums.
HIDDENS = [1, 7, 577, 4096, 8192, 16384, 64, 200, 1000, 5000, 20000]
ROWS = [1, 3, 130]


@pytest.fixture(scope="session")
def emulated_norms(tmp_path_factory):
    """The norm kernels of csrc/cuda built for the CPU emulator (tests/cuda_emu)."""
    from .cuda_emu import build

    missing = build.missing_tools()
    if missing:
        pytest.skip(f"CUDA emulator: {missing}")
    return build.EmulatedNorms(build.build(tmp_path_factory.mktemp("cuda_emu")))


def test_emulator_rewrites_launches_and_shared_arrays():
    from .cuda_emu.build import rewrite

    src = "  k<TX, 4, true><<<grid, dim3(32, 4), 0, st>>>(a);\n  __shared__ float red[2][4][32];"
    assert rewrite(src) == (
        "  ::emu::launch(k<TX, 4, true>, grid, dim3(32, 4), 0, st)(a);\n"
        "  static float red__emu[2][4][32]; auto& red = ::emu::shared(red__emu);"
    )


def test_emulator_catches_races_and_divergent_barriers(emulated_norms):
    """tests/cuda_emu/selftest.cu: one block of two warps sums 64 floats. Correct, it gives
    the sum whatever the interleaving; without the barrier before reading the other warp's
    partial, some interleavings read poisoned shared memory; a __syncthreads only one warp
    reaches and a shuffle half a warp reaches are errors."""
    x = torch.arange(64, dtype=torch.float32)
    racy = []
    for seed in range(8):
        emulated_norms.seed(seed)
        out = torch.zeros(1)
        emulated_norms.selftest_block_sum(x, out, 0)
        assert out.item() == 2016.0
        emulated_norms.selftest_block_sum(x, out, 1)
        racy.append(out.item())
    assert any(v != v for v in racy) and 2016.0 in racy, racy
    with pytest.raises(RuntimeError, match="exited before a __syncthreads"):
        emulated_norms.selftest_block_sum(x, out, 2)
    with pytest.raises(RuntimeError, match="diverge at a warp shuffle"):
        emulated_norms.selftest_block_sum(x, out, 3)


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emu"])
def backend(request):
    """Where the kernels run: "cuda", ringfuse._C's entries on a GPU (gpu-marked), or
    "emu", the same sources on tests/cuda_emu's CPU emulator, whose warps interleave in an
    order seeded per test (so that a race shows as a wrong result in some test)."""
    return request.param


@pytest.fixture
def C(backend, request):
    if backend == "cuda":
        return cuda_C()
    emu = request.getfixturevalue("emulated_norms")
    emu.seed(zlib.crc32(request.node.nodeid.encode()))
    return emu


@pytest.fixture
def device(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_cuda(C, device, dtype, hidden, rows, residual):
    check_rms(C, device, dtype, rows, hidden, residual)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_cuda(C, device, dtype, hidden, rows, residual):
    check_ln(C, device, dtype, rows, hidden, residual)


@pytest.mark.parametrize("hidden", [7, 577, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_cuda_llama_cast(C, device, dtype, hidden):
    for residual in (False, True):
        check_rms(C, device, dtype, 3, hidden, residual, llama=True)
        check_rms(C, device, dtype, 3, hidden, residual, llama=True, with_weight=False)


@pytest.mark.parametrize("hidden", [7, 577, 4096, 40000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rms_norm_cuda_llama_cast_rounds_before_the_weight(C, device, dtype, hidden):
    """The tolerance check cannot tell the two orders apart (they differ by one rounding),
    this can: with a float32 weight of 3 and a float32 out, the llama order gives
    out = round_x(s * rstd) * 3 exactly, so out / 3 is a value of x's dtype everywhere;
    torch's order (one rounding of s * rstd * 3 to float32) is not, on most elements."""
    x, r, _, _ = make_inputs(3, hidden, dtype, device, seed=17)
    w = torch.full((hidden,), 3.0, device=device)
    for llama in (True, False):
        out = torch.empty(3, hidden, device=device)
        call_rms(C, out, x, w, 1e-6, r, torch.empty_like(x), llama)
        n = out.cpu().double() / 3
        exact = n.to(dtype).double() == n
        if llama:
            assert exact.all(), f"{dtype} [3, {hidden}]: {int((~exact).sum())} outputs not round_x(s * rstd) * w"
        elif hidden >= 577:
            assert exact.float().mean() < 0.5, f"{dtype} [3, {hidden}]: llama_cast=False rounded like llama"


@pytest.mark.parametrize("hidden", [7, 577, 4096, 16384])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norms_cuda_float32_weight_and_out(C, device, dtype, hidden):
    """Weight (and bias) float32 with 16-bit x; out x dtype or float32."""
    for out_dtype in (dtype, torch.float32):
        for llama in (False, True):
            check_rms(C, device, dtype, 3, hidden, True, llama=llama, w_dtype=torch.float32, out_dtype=out_dtype)
        check_rms(C, device, dtype, 3, hidden, False, out_dtype=out_dtype)
        check_ln(C, device, dtype, 3, hidden, True, w_dtype=torch.float32, out_dtype=out_dtype)
        check_ln(C, device, dtype, 3, hidden, False, out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_cuda_optional_params(C, device, dtype):
    for hidden in (7, 4096):
        check_rms(C, device, dtype, 3, hidden, True, with_weight=False)
        check_ln(C, device, dtype, 3, hidden, True, with_weight=False)
        check_ln(C, device, dtype, 3, hidden, False, with_bias=False)
        check_ln(C, device, dtype, 3, hidden, False, with_weight=False, with_bias=False)


@pytest.mark.parametrize("hidden", [32768, 40000, 40001, 65536])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_cuda_long_rows(C, device, dtype, hidden):
    """Rows longer than the register kernels hold take the streaming kernel."""
    check_rms(C, device, dtype, 3, hidden, True)
    check_rms(C, device, dtype, 2, hidden, False, llama=True)
    check_ln(C, device, dtype, 3, hidden, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_cuda_large_mean(C, device, dtype):
    """|mean| >> std: the two-pass variance has no cancellation."""
    for hidden in (200, 577, 1000, 4096, 5000, 40000):
        check_ln(C, device, dtype, 3, hidden, False, offset=300.0)
        check_ln(C, device, dtype, 3, hidden, True, offset=300.0)


@pytest.mark.parametrize("hidden", [7, 577, 4096, 16384, 40000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_cuda_in_place(C, device, dtype, hidden):
    check_in_place(C, device, dtype, 5, hidden)


@pytest.mark.parametrize("hidden", [7, 577, 4096, 40000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_cuda_strided(C, device, dtype, hidden):
    check_strided(C, device, dtype, 3, hidden)


def check_non_finite(C, device, dtype, hidden):
    """A NaN in a row makes the row NaN; an inf gives the formula's NaN pattern, which is the
    fp64 reference's and torch's on the CPU (rms_norm: rstd = 0, so NaN only where the inf
    was and 0 elsewhere; layer_norm: an inf mean, so the whole row NaN); the other rows stay
    finite."""
    from .ops.norm_reference import ln_ref64, rms_ref64

    x, r, w, b = make_inputs(4, hidden, dtype, device, seed=13)
    x[1, hidden // 2] = float("nan")
    x[2, hidden - 1] = float("inf")
    xc, wc, bc = on_cpu(x, w, b)
    for op in ("rms", "ln"):
        out = torch.empty_like(x)
        if op == "rms":
            call_rms(C, out, x, w, 1e-6)
            ref = rms_ref64(xc, wc, 1e-6)
        else:
            call_ln(C, out, x, w, b, 1e-5)
            ref = ln_ref64(xc, wc, bc, 1e-5)
        out = out.cpu()
        assert out[1].isnan().all(), f"{op} {dtype} {hidden}"
        for i in (0, 3):
            assert out[i].isfinite().all(), f"{op} {dtype} {hidden} row {i}"
        nan_rows = [i for i in range(4) if not torch.equal(out[i].isnan(), ref[i].isnan())]
        assert not nan_rows, f"{op} {dtype} {hidden}: NaNs differ from the fp64 reference in rows {nan_rows}"


@pytest.mark.parametrize("hidden", [7, 4096, 40000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_cuda_non_finite(C, device, dtype, hidden):
    check_non_finite(C, device, dtype, hidden)


def test_norms_cuda_deterministic_and_empty(C, device):
    x, r, w, b = make_inputs(130, 8192, torch.bfloat16, device, seed=9)
    outs = []
    for _ in range(3):
        out, s = torch.empty_like(x), torch.empty_like(x)
        call_rms(C, out, x, w, 1e-6, r, s)
        out2 = torch.empty_like(x)
        call_ln(C, out2, x, w, b, 1e-5, r, s.clone())
        outs.append((out, out2))
    assert all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs)
    # rows == 0 is a no-op, even with null pointers
    C.rms_norm_cuda(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 1e-6, 2, 2, 2, False, _stream(x))
    C.layer_norm_cuda(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 1e-5, 2, 2, 2, _stream(x))
    if x.is_cuda:
        torch.cuda.synchronize()


@pytest.mark.gpu
def test_norms_cuda_non_default_stream():
    C = cuda_C()
    x, r, w, _ = make_inputs(64, 4096, torch.float16, device, seed=11)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = torch.empty_like(x)
        call_rms(C, out, x, w, 1e-6)
    torch.cuda.current_stream().wait_stream(s)
    from .ops.norm_reference import assert_within_tolerance, rms_ref64, rms_torch

    out, x, w = on_cpu(out, x, w)
    assert_within_tolerance(out, rms_ref64(x, w, 1e-6), rms_torch(x, w, 1e-6), "side stream")


# ---------------------------------------------------------------------------------------
# 3. Boundary checks: they throw before any CUDA call, so they need the CUDA build only.
# ---------------------------------------------------------------------------------------

BAD_ARGS = {
    # name: (rms kwargs overrides, message fragment)
    "null out": ({"out": 0}, "null out or x"),
    "null x": ({"x": 0}, "null out or x"),
    "hidden 0": ({"hidden": 0}, "hidden must be >= 1"),
    "rows < 0": ({"rows": -1}, "rows must be >= 0"),
    "eps 0": ({"eps": 0.0}, "eps must be"),
    "eps < 0": ({"eps": -1e-6}, "eps must be"),
    "eps nan": ({"eps": float("nan")}, "eps must be"),
    "x int8": ({"x_dtype": 3}, "x dtype must be"),
    "w fp16 with bf16 x": ({"w_dtype": 1}, "weight dtype must"),
    "out fp16 with bf16 x": ({"out_dtype": 1}, "out dtype must"),
    "residual without residual_out": ({"residual": 4096}, "given together"),
    "short stride": ({"x_stride": 32}, "row strides"),
}


def _rms_args(**over):
    a = dict(out=1 << 20, out_stride=64, residual_out=0, residual_out_stride=0, x=2 << 20, x_stride=64,
             residual=0, residual_stride=0, weight=0, rows=4, hidden=64, eps=1e-6, x_dtype=2, w_dtype=2,
             out_dtype=2, llama_cast=False, stream=0)  # fmt: skip
    a.update(over)
    return list(a.values())


def _ln_args(**over):
    a = _rms_args(**over)
    a.insert(9, 0)  # bias after weight
    del a[-2]  # no llama_cast
    return a


@pytest.mark.parametrize("case", list(BAD_ARGS), ids=str)
def test_cuda_entries_reject_bad_arguments(case):
    C = cuda_C()
    over, msg = BAD_ARGS[case]
    with pytest.raises(ValueError, match=msg):
        C.rms_norm_cuda(*_rms_args(**over))
    with pytest.raises(ValueError, match=msg):
        C.layer_norm_cuda(*_ln_args(**over))


def test_cuda_entries_report_launch_errors_without_device():
    """No device (or no driver): the launch fails and the error names the CUDA error."""
    if torch.cuda.is_available():
        pytest.skip("a device is present: these fake pointers would be dereferenced")
    C = cuda_C()
    with pytest.raises(ValueError, match="rms_norm: CUDA kernel launch failed: cuda"):
        C.rms_norm_cuda(*_rms_args())
    with pytest.raises(ValueError, match="layer_norm: CUDA kernel launch failed: cuda"):
        C.layer_norm_cuda(*_ln_args())
