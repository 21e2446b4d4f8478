"""kernels/int8_gemm.py under the Triton interpreter (TRITON_INTERPRET=1, set in conftest),
on CPU tensors, and its shipped configs compiled for sm_80 / sm_90 with no spills.

- quantize_per_token_fwd: bitwise vs the torch formula.
- int8_gemm_fwd, int32 out: bit for bit vs torch's int64 product (the interpreter's int8
  tl.dot is numpy's matmul with an int32 result: exact, so no workaround is needed there).
- int8_gemm_fwd, float out: per element, |out - ref| <= 2 |ref.to(dtype) - ref| + 4 fp32
  ulps of (|a_q b_q^T a_scale b_scale| + |bias|), ref in fp64: at most twice torch's own
  rounding of the exact result, plus the three fp32 roundings of the epilogue.
- weight_only_fwd: ARCHITECTURE.md's tolerance rule: max error vs the fp64 reference <= 2x that of torch's
  same-dtype F.linear(x, w_deq.to(dtype), bias.to(dtype)), plus 4 fp32 ulps of max |ref|.

Shapes are odd (1, 3, 17, 33, 77, 129, 200, 577) so every mask is exercised, plus sizes that
are multiples of 16, which take the aligned tiles (the launchers pick tiles by alignment).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from .triton_helpers import compile_in_child, compile_problems, interp_only

from ringfuse.kernels import compile_check
from ringfuse.kernels import int8_gemm as triton_int8

int8_gemm_fwd = triton_int8.int8_gemm_fwd
weight_only_fwd = triton_int8.weight_only_fwd

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps

# rounds the interpreter's fp32 -> bf16 casts as GPUs do (tests/kernels/conftest.py)
pytestmark = pytest.mark.usefixtures("interpreter_bf16_round_to_nearest_even")


def dt_id(d):
    return str(d)[6:]


def reference(x):
    xf = x.float()
    scale = xf.abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[:, None] > 0, torch.round(xf / safe[:, None]).clamp(-127, 127), 0.0)
    return q.to(torch.int8), scale


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 7, 300, 1025, 5000])
def test_quantize_matches_reference(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(5, k, generator=g) * 3).to(dtype)
    x[1] = 0
    if k >= 8:
        x[2, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0, 126.5]).to(dtype)  # ties
    x[4, 0] = float("nan")
    q, scale = torch.empty(5, k, dtype=torch.int8), torch.empty(5)
    triton_int8.quantize_per_token_fwd(q, scale, x)
    ref_q, ref_scale = reference(x[:4])
    assert torch.equal(q[:4], ref_q) and torch.equal(scale[:4], ref_scale)
    assert bool(torch.isnan(scale[4])) and bool((q[4] == 0).all())


# ---------------------------------------------------------------------------------------
# int8_gemm_fwd


def rand_int8(shape, g):
    """Uniform over [-128, 127], with the extremes forced in: row 0 all -128 (the largest
    positive products: (-128)^2 K), the last row all 127."""
    t = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
    t[0] = -128
    if shape[0] > 1:
        t[-1] = 127
    return t


def exact_product(a, b):
    """a b^T, exact: integer products <= 2^14 summed over K < 2^17 stay far below 2^53, so
    every fp64 partial sum is an exact integer whatever the summation order."""
    return (a.double() @ b.double().T).long()


# (M, K, N): odd sizes from {1, 3, 17, 33, 129} and K = 577 (unaligned tiles, masks along
# every axis), then multiples of 16 (the aligned tiles of each M bucket)
GEMM_SHAPES = [(1, 577, 3), (3, 33, 129), (17, 129, 17), (33, 1, 33), (129, 17, 1), (129, 577, 33),
               (16, 64, 80), (48, 128, 144), (144, 256, 129)]  # fmt: skip


@interp_only
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES, ids=lambda v: str(v))
def test_int8_gemm_int32_exact(m, k, n):
    g = torch.Generator().manual_seed(m * 10000 + k * 10 + n)
    a, b = rand_int8((m, k), g), rand_int8((n, k), g)
    out = torch.empty(m, n, dtype=torch.int32)
    int8_gemm_fwd(out, a, b, None, None, None)
    assert torch.equal(out.long(), exact_product(a, b))


@interp_only
def test_int8_gemm_strided_rows():
    """a, b and out are column windows of wider buffers (row strides K + 5, K + 7, N + 3):
    the same exact result, and nothing outside out's window is written."""
    m, k, n = 17, 129, 33
    g = torch.Generator().manual_seed(3)
    a = rand_int8((m, k + 5), g)[:, 2 : 2 + k]
    b = rand_int8((n, k + 7), g)[:, :k]
    assert a.stride(0) == k + 5 and b.stride(0) == k + 7
    big = torch.full((m, n + 3), -7, dtype=torch.int32)
    out = big[:, 1 : 1 + n]
    int8_gemm_fwd(out, a, b, None, None, None)
    assert torch.equal(out.long(), exact_product(a, b))
    assert (big[:, 0] == -7).all() and (big[:, 1 + n :] == -7).all()


def check_scaled(out, a, b, a_scale, b_scale, bias):
    prod = exact_product(a, b).double() * a_scale.double()[:, None] * b_scale.double()[None, :]
    bias64 = bias.double()[None, :] if bias is not None else torch.zeros(1, 1, dtype=torch.float64)
    ref = prod + bias64
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    torch_err = (ref.to(out.dtype).double() - ref).abs()
    bound = 2 * torch_err + 4 * EPS32 * (prod.abs() + bias64.abs())
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} elements off; worst excess {(err - bound).max().item():.3e}"


@interp_only
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dt_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,k,n", [(3, 577, 33), (33, 129, 17), (48, 128, 144)], ids=lambda v: str(v))
def test_int8_gemm_float_out(dtype, with_bias, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a, b = rand_int8((m, k), g), rand_int8((n, k), g)
    # scales as quantize_per_token makes them (max / 127), bias of the output's magnitude
    a_scale = torch.rand(m, generator=g) * 0.05 / 127
    b_scale = torch.rand(n, generator=g) * 0.05 / 127
    bias = torch.randn(n, generator=g) * 0.2 if with_bias else None
    out = torch.empty(m, n, dtype=dtype)
    int8_gemm_fwd(out, a, b, a_scale, b_scale, bias)
    check_scaled(out, a, b, a_scale, b_scale, bias)


# ---------------------------------------------------------------------------------------
# weight_only_fwd


def dequantized(w_q, w_scale, group_size):
    """w_q * scale in fp64: per channel ([N]) or per group along K ([N, cdiv(K, g)])."""
    k = w_q.shape[1]
    if group_size is None:
        return w_q.double() * w_scale.double()[:, None]
    return w_q.double() * w_scale.double().repeat_interleave(group_size, dim=1)[:, :k]


def make_weight_only(m, k, n, dtype, group_size, with_bias, g):
    x = torch.randn(m, k, generator=g).to(dtype)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w_q[0, :] = 127  # extremes of symmetric quantization, and -128, which it never makes
    if n > 1:
        w_q[-1, :] = -128
    groups = 1 if group_size is None else -(-k // group_size)
    w_scale = (torch.rand(n, groups, generator=g) + 0.5) * 0.02
    if group_size is None:
        w_scale = w_scale[:, 0].contiguous()
    bias = torch.randn(n, generator=g) if with_bias else None
    return x, w_q, w_scale, bias


def check_weight_only(out, x, w_q, w_scale, bias, group_size):
    w_deq = dequantized(w_q, w_scale, group_size)
    ref = x.double() @ w_deq.T
    if bias is not None:
        ref = ref + bias.double()
    base = F.linear(x, w_deq.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    err_torch = (base.double() - ref).abs().max().item()
    floor = 4 * EPS32 * max(ref.abs().max().item(), 1e-3)
    assert err <= 2 * err_torch + floor, f"kernel error {err:.3e} > 2 x torch error {err_torch:.3e} (+{floor:.1e})"


# (M, K, N, group_size): K = 77 and 200 leave a partial last group of 32 (13 and 8 columns);
# M 1 / 5 / 16 are decode, 17 and 65 the two larger buckets; K = 256 / 128 the aligned tiles
WO_SHAPES = [(1, 77, 33, None), (5, 200, 17, None), (17, 77, 129, None), (33, 64, 17, None), (65, 128, 33, None),
             (1, 77, 33, 32), (5, 200, 17, 32), (17, 200, 65, 32), (16, 256, 48, 32), (65, 128, 33, 32)]  # fmt: skip


@interp_only
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dt_id)
@pytest.mark.parametrize("m,k,n,group_size", WO_SHAPES, ids=lambda v: str(v))
def test_weight_only_matches_reference(dtype, m, k, n, group_size):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w_q, w_scale, bias = make_weight_only(m, k, n, dtype, group_size, (m + k) % 2 == 1, g)
    out = torch.empty(m, n, dtype=dtype)
    weight_only_fwd(out, x, w_q, w_scale, bias, group_size)
    check_weight_only(out, x, w_q, w_scale, bias, group_size)


@interp_only
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dt_id)
@pytest.mark.parametrize("group_size", [None, 48, 128], ids=lambda v: f"g{v}")
def test_weight_only_split_k(dtype, group_size):
    """Decode with split-K, forced (3 splits over K = 577: the last split short) and chosen
    by the launcher (K = 2048, aligned: 8 tiles of 256 -> 2 splits), with bias; group 48
    takes BLOCK_K 16, group 128 leaves a partial last group at K = 577."""
    g = torch.Generator().manual_seed(11)
    for m, k, n, split_k in ((3, 577, 33, 3), (2, 2048, 17, None)):
        x, w_q, w_scale, bias = make_weight_only(m, k, n, dtype, group_size, True, g)
        plan = triton_int8._wo_plan(dtype, triton_int8.is_aligned((x, w_q), (x.stride(0), w_q.stride(0), k)),
                                    triton_int8.m_bucket(m), n, k, group_size, True, split_k)  # fmt: skip
        assert plan[3] > 1 and plan[5] is not None, plan[3]  # more than one split, reduction kernel
        out = torch.empty(m, n, dtype=dtype)
        weight_only_fwd(out, x, w_q, w_scale, bias, group_size, split_k=split_k)
        check_weight_only(out, x, w_q, w_scale, bias, group_size)
        again = torch.empty_like(out)
        weight_only_fwd(again, x, w_q, w_scale, bias, group_size, split_k=split_k)
        assert torch.equal(out, again)  # the splits are summed in a fixed order


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dt_id)
def test_weight_only_strided(dtype):
    """x, w_q, the per-group scales and out as column windows of wider buffers: the same
    result as on contiguous copies, nothing outside out's window written."""
    m, k, n, gs = 5, 200, 33, 32
    g = torch.Generator().manual_seed(4)
    x = torch.randn(m, k + 3, generator=g).to(dtype)[:, 1 : 1 + k]
    w_q = torch.randint(-127, 128, (n, k + 9), dtype=torch.int8, generator=g)[:, :k]
    w_scale = ((torch.rand(n, 10, generator=g) + 0.5) * 0.02)[:, 2 : 2 + 7]
    bias = torch.randn(n, generator=g)
    big = torch.full((m, n + 4), -7.0, dtype=dtype)
    out = big[:, 2 : 2 + n]
    weight_only_fwd(out, x, w_q, w_scale, bias, gs)
    check_weight_only(out, x, w_q, w_scale, bias, gs)
    assert (big[:, :2] == -7).all() and (big[:, 2 + n :] == -7).all()
    out_c = torch.empty(m, n, dtype=dtype)
    weight_only_fwd(out_c, x.contiguous(), w_q.contiguous(), w_scale.contiguous(), bias, gs)
    assert torch.equal(out_c, out)


# ---------------------------------------------------------------------------------------
# On a GPU: the compiled kernels (int8 mma / wgmma, bf16 / fp16 tensor-core dots, split-K)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.bfloat16, torch.float16, torch.float32], ids=dt_id)
def test_gpu_int8_gemm(out_dtype):
    g = torch.Generator().manual_seed(21)
    for m, k, n in ((1, 4096, 1024), (16, 4096, 1000), (77, 1536, 576), (300, 1024, 1000), (513, 577, 333)):
        a, b = rand_int8((m, k), g), rand_int8((n, k), g)
        out = torch.empty(m, n, dtype=out_dtype, device="cuda")
        if out_dtype == torch.int32:
            int8_gemm_fwd(out, a.cuda(), b.cuda(), None, None, None)
            assert torch.equal(out.cpu().long(), exact_product(a, b)), (m, k, n)
        else:
            a_scale = torch.rand(m, generator=g) * 0.05 / 127
            b_scale = torch.rand(n, generator=g) * 0.05 / 127
            bias = torch.randn(n, generator=g) * 0.2
            int8_gemm_fwd(out, a.cuda(), b.cuda(), a_scale.cuda(), b_scale.cuda(), bias.cuda())
            check_scaled(out.cpu(), a, b, a_scale, b_scale, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dt_id)
def test_gpu_weight_only(dtype):
    g = torch.Generator().manual_seed(22)
    for m, k, n, gs in ((1, 4096, 4096, None), (1, 4096, 4096, 128), (7, 576, 1536, 32), (16, 1536, 576, None),
                        (200, 1000, 333, 64), (300, 4096, 1024, 128)):  # fmt: skip
        x, w_q, w_scale, bias = make_weight_only(m, k, n, dtype, gs, True, g)
        out = torch.empty(m, n, dtype=dtype, device="cuda")
        weight_only_fwd(out, x.cuda(), w_q.cuda(), w_scale.cuda(), bias.cuda(), gs)
        check_weight_only(out.cpu(), x, w_q, w_scale, bias, gs)


# ---------------------------------------------------------------------------------------
# Config choice (no interpreter needed)


def test_config_rules():
    t = triton_int8
    assert [t.m_bucket(m) for m in (1, 16, 17, 64, 65, 4096)] == [16, 16, 64, 64, None, None]
    bf = torch.bfloat16
    assert [t.wo_block_k(bf, True, 16, g) for g in (None, 16, 32, 48, 64, 128, 256, 512)] == [256, 16, 32, 16, 64,
                                                                                               128, 256, 256]
    assert t.wo_block_k(torch.float32, True, 16, 128) == 64
    # decode, K = N = 4096, aligned bf16: 128 N tiles of 32, 16 K tiles of 256 -> 3 splits of 6, 6, 4 tiles
    assert t.num_splits_for(4096, 4096, 32, 256) == (3, 1536)
    assert t.num_splits_for(576, 576, 32, 256) == (1, 768)  # too little K to split: one program's worth
    assert t.num_splits_for(1, 65536, 32, 256) == (16, 4096)  # capped at MAX_SPLITS
    with pytest.raises(ValueError, match="split_k"):
        t._wo_plan(bf, True, 64, 32, 64, None, False, 2)


def test_launchers_pick_exactly_the_shipped_configs():
    """On a GPU (DOT_FP32 off unless x is fp32) every launch plan is in SHIPPED_CONFIGS, and
    every shipped config is some launch's plan (nothing listed that cannot run)."""
    t = triton_int8
    shipped = {(c["kernel"].__name__, tuple(c["constexprs"].items()), c["num_warps"], c["aligned"])
               for c in t.SHIPPED_CONFIGS if c["kernel"] is not t._quantize_per_token_kernel}  # fmt: skip
    key = {(c["kernel"].__name__, tuple(c["signature"].items()), tuple(c["constexprs"].items()), c["num_warps"],
            c["aligned"]) for c in t.SHIPPED_CONFIGS}  # fmt: skip
    assert len(key) == len(t.SHIPPED_CONFIGS)

    seen = set()
    for aligned in (True, False):
        for m in (1, 16, 17, 64, 65, 1000):
            for odt in t.GEMM_OUT_DTYPES:
                for bias in (False, True):
                    kernel, cexp, nw = t._gemm_plan(odt, aligned, t.m_bucket(m), bias and odt != torch.int32)
                    seen.add((kernel.__name__, tuple(cexp.items()), nw, aligned))
            for dtype in t.X_DTYPES:
                for n, k in ((33, 77), (4096, 4096)):
                    for gs in (None, 16, 32, 48, 64, 128, 256, 512):
                        for bias in (False, True):
                            plan = t._wo_plan(dtype, aligned, t.m_bucket(m), n, k, gs, bias, None)
                            kernel, cexp, nw = plan[:3]
                            cexp = {**cexp, "DOT_FP32": dtype == torch.float32}
                            seen.add((kernel.__name__, tuple(cexp.items()), nw, aligned))
                            if plan[5] is not None:  # the reduction does not depend on alignment
                                seen.add((plan[5].__name__, tuple(plan[6].items()), plan[7], False))
    assert seen <= shipped, sorted(seen - shipped, key=str)[:5]
    assert shipped <= seen, sorted(shipped - seen, key=str)[:5]


# ---------------------------------------------------------------------------------------
# GPU compiles (sm_80, sm_90) without a device

ARCHS = (80, 90)
COMPILE_ALL = os.environ.get("RINGFUSE_COMPILE_ALL") == "1"
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per CTA


def _attrs(cfg, ones=()):
    """Divisibility attributes as the JIT derives them for the config's launches: all 16-
    aligned for an aligned config (ALIGNED_ARGS), else none beyond the always-divisible
    ints (the worst case); pointers not in ALIGNED_ARGS are left unaligned (out, scales)."""
    kernel = cfg["kernel"]
    names = triton_int8.ALIGNED_ARGS.get(kernel.__name__, ()) if cfg["aligned"] else ()
    names = set(names) | set(triton_int8.ALWAYS_DIVISIBLE_ARGS.get(kernel.__name__, ()))
    if kernel is triton_int8._quantize_per_token_kernel:
        names = {"q_ptr", "scale_ptr", "x_ptr"}  # torch allocations, as the older check assumed
    return [[i, [["tt.divisibility", 16]]] for i, a in enumerate(kernel.arg_names) if a in names and a not in ones]


def _representative(configs):
    """Each distinct tile (kernel, BLOCK_M / N / K, num_warps, aligned) once, with the bf16
    signature (bf16 out for the GEMM, bf16 x for the weight-only kernel) and every flag that
    costs registers on (bias; per-group scales, no split); fp32 x has tiles of its own (the
    FMA path of tl.dot) and gets the same; one reduction; quantize as before (bf16)."""
    picked = {}
    for cfg in configs:
        sig, cexp = cfg["signature"], cfg["constexprs"]
        name = cfg["kernel"].__name__
        dtype = sig.get("x_ptr") or sig["out_ptr"]
        if name == "_int8_gemm_kernel":
            ok = dtype == "*bf16" and cexp["HAS_BIAS"]
        elif name == "_weight_only_kernel":
            ok = dtype in ("*bf16", "*fp32") and cexp["HAS_BIAS"] and cexp["GROUPED"] and not cexp["SPLIT"]
        elif name == "_split_k_reduce_kernel":
            ok = dtype == "*bf16" and cexp["PER_CHANNEL"] and cexp["HAS_BIAS"]
        else:
            ok = dtype == "*bf16"
        tile = tuple(cexp.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK"))
        key = (name, tile, cfg["num_warps"], cfg["aligned"], dtype if dtype == "*fp32" else "")
        if ok and key not in picked:
            picked[key] = cfg
    return list(picked.values())


def _special_jobs(arch):
    """Decode as Triton's JIT compiles it for M = 1 (an int == 1 becomes a constexpr) with
    aligned operands: the GEMM and the weight-only kernel, split and unsplit."""
    t, bf = triton_int8, torch.bfloat16
    jobs = []
    for kernel, sig, cexp, nw in (t._gemm_spec(bf, True, 16, True), t._wo_spec(bf, True, 16, 256, False, True, False),
                                  t._wo_spec(bf, True, 16, 256, False, False, True)):  # fmt: skip
        cfg = {"kernel": kernel, "aligned": True}
        jobs.append({"module": "int8_gemm", "kernel": kernel.__name__, "signature": {**sig, "M": "constexpr"},
                     "constexprs": {**cexp, "M": 1}, "arch": arch, "num_warps": nw,
                     "attrs": _attrs(cfg, ones=("M",))})  # fmt: skip
    return jobs


def test_shipped_configs_compile_without_spills():
    """A representative subset of SHIPPED_CONFIGS (``_representative``: 32 of its 189
    variants, each distinct tile once; compiling all of them for two archs takes ~3 minutes
    on the 2-core dev VM: RINGFUSE_COMPILE_ALL=1 does) plus the M = 1 decode specializations
    compiles for sm_80 and sm_90:
    a cubin for the arch, no spills, registers within the file, shared memory within the
    arch's limit; quantize with correctly rounded divisions only (the CPU's bits). Aligned
    configs are compiled with the divisibility the JIT gives them, the others without (the
    worst case)."""
    configs = triton_int8.SHIPPED_CONFIGS if COMPILE_ALL else _representative(triton_int8.SHIPPED_CONFIGS)
    assert len(configs) == (189 if COMPILE_ALL else 32)
    jobs, what = [], []
    for cfg in configs:
        for arch in ARCHS:
            jobs.append({"module": "int8_gemm", "kernel": cfg["kernel"].__name__, "signature": cfg["signature"],
                         "constexprs": cfg["constexprs"], "arch": arch, "num_warps": cfg["num_warps"],
                         "attrs": _attrs(cfg)})  # fmt: skip
            what.append(cfg["id"])
    for arch in ARCHS:
        special = _special_jobs(arch)
        jobs += special
        what += [f"special-M1-{j['kernel']}-{i}" for i, j in enumerate(special)]
    failures = []
    for job, res, w in zip(jobs, compile_in_child(compile_check.__name__, jobs), what):
        problems = compile_problems(res, MAX_SHARED[job["arch"]])
        if job["kernel"] == "_quantize_per_token_kernel" and res["approx_ops"]:
            # scale = max / 127 and x / scale must be the CPU's bits (tl.div_rn, not `/`)
            problems.append(f"approximate fp32 math {res['approx_ops']}")
        if problems:
            failures.append(f"{w} sm_{job['arch']}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)
