"""Every shipped attention config compiles for real GPUs (sm_80, sm_90) without a device,
spills nothing, stays within the register file and fits in shared memory (ARCHITECTURE.md, "GPU
code without a GPU").

kernels/attention.py can choose 424 variants: 3 dtypes x 4 BLOCK_D buckets x (24 prefill
flag combinations (full / causal / causal with a sliding window, softcap, lse, varlen) +
2 x 2 decode stage-1 (contiguous / paged, softcap) + 1 stage 2 + 1 write_kv), plus the 16-bit
variants with the aligned tiles, 24 prefill at D 128 and 4 decode at D 64 and 128 (compiled
knowing the arguments the launcher guarantees to be multiples of 16). Compiling all
of them for two archs takes several minutes on the 2-core dev VM (RINGFUSE_COMPILE_ALL=1
does). By default each (kernel, BLOCK_D) is compiled for bf16 (fp16 is the same code with
another element type) with every flag on and with every flag but softcap, each with and
without a window, plus the prefill kernel with fp32 inputs (its own tiles, the most
registers and shared memory) the same ways, plus the variants Triton's JIT derives from
argument values (ints == 1 as constexprs, 16-divisible ints): 128 compiles, ~100 s (each
compile_check run starts with an empty private Triton cache).

The tests run under the Triton interpreter, which cannot compile for a GPU, so all compiles
happen in one child process without TRITON_INTERPRET (`python -m
ringfuse.kernels.compile_check`), and the tests check its results.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from .triton_helpers import compile_in_child, compile_problems

from ringfuse.kernels import attention as triton_attention
from ringfuse.kernels import compile_check

ARCHS = (80, 90)
COMPILE_ALL = os.environ.get("RINGFUSE_COMPILE_ALL") == "1"
# max dynamic shared memory per CTA: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
FLAGS = ("CAUSAL", "SOFTCAP", "HAS_LSE", "VARLEN")


# Flag sets compiled by default: every flag on, and every flag but softcap (the usual
# model). ptxas' allocation differs between variants: the earlier fp32 tiles spilled 230 to
# 13,800 bytes in 24 variants with softcap or varlen off (softcap-off ones among them) while
# the all-on variant compiled clean.
PICKED_FLAGS = ({f: True for f in FLAGS}, {**{f: True for f in FLAGS}, "SOFTCAP": False})


def _representative(configs):
    picked = []
    for cfg in configs:
        cexp = cfg["constexprs"]
        if not any(all(cexp.get(f, v) == v for f, v in flags.items()) for flags in PICKED_FLAGS):
            continue
        sig = cfg["signature"]
        dtype = sig.get("q_ptr") or sig.get("k_ptr") or sig.get("out_ptr")
        is_flash = cfg["kernel"] is triton_attention._flash_attn_fwd_kernel
        if dtype in (None, "*bf16") or (dtype == "*fp32" and is_flash):  # None: the check kernels (no float data)
            picked.append(cfg)
    return picked


CONFIGS = triton_attention.SHIPPED_CONFIGS if COMPILE_ALL else _representative(triton_attention.SHIPPED_CONFIGS)


def _aligned_attrs(cfg):
    """None (every pointer 16-byte aligned, no int known divisible: the worst case a launch
    of the variant can see), or for an aligned prefill tile the pointers plus the ints the
    launcher guarantees (aligned_args) as multiples of 16."""
    if not cfg.get("aligned_args"):
        return None
    sig = cfg["signature"]
    return [[i, [["tt.divisibility", 16]]] for i, a in enumerate(sig)
            if sig[a].startswith("*") or a in cfg["aligned_args"]]  # fmt: skip


def _job(kernel, sig, cexp, arch, nw, attrs=None) -> dict:
    return {"module": "attention", "kernel": kernel.__name__, "signature": sig, "constexprs": cexp, "arch": arch,
            "num_warps": nw, "attrs": attrs}  # fmt: skip


def _specialization_jobs(arch):
    """Variants Triton's JIT derives at launch from argument values: ints == 1 become
    constexprs (MHA group 1, one query row Sq = 1, num_splits 1, unit strides of
    one-element dims), and 16-divisible ints / pointers get tt.divisibility."""
    ta, bf = triton_attention, torch.bfloat16
    jobs = []
    for kernel, sig, cexp, nw in (ta._flash_spec(bf, 128, True, True, True), ta._decode_spec(bf, 128, True, True),
                                  ta._decode_spec(bf, 128, True, False), ta._stage2_spec(bf, 128)):  # fmt: skip
        ones = [k for k in ("group", "Sq", "num_splits") if sig.get(k) == "i32"]
        sig1 = {k: ("constexpr" if k in ones else v) for k, v in sig.items()}
        jobs.append(_job(kernel, sig1, {**cexp, **{k: 1 for k in ones}}, arch, nw))
        aligned = [[i, [["tt.divisibility", 16]]] for i, a in enumerate(sig) if sig[a] not in ("constexpr", "fp32")]
        jobs.append(_job(kernel, sig, cexp, arch, nw, aligned))
    return jobs


N_SPECIAL = 8


@pytest.fixture(scope="module")
def compiled():
    """{(config id, arch): result} for the configs and the runtime specializations, both
    archs, compiled in one child process with the interpreter off."""
    jobs, keys = [], []
    for cfg in CONFIGS:
        for arch in ARCHS:
            jobs.append(_job(cfg["kernel"], cfg["signature"], cfg["constexprs"], arch, cfg["num_warps"],
                             _aligned_attrs(cfg)))  # fmt: skip
            keys.append((cfg["id"], arch))
    for arch in ARCHS:
        spec = _specialization_jobs(arch)
        assert len(spec) == N_SPECIAL
        jobs += spec
        keys += [(f"special-{i}", arch) for i in range(len(spec))]
    return dict(zip(keys, compile_in_child(compile_check.__name__, jobs)))


# Exempt from the headroom reading (triton_helpers.compile_problems; kernels/attention.py
# _FLASH_TILES), {config id pattern: archs}: 16-bit D 256 flash (64, 32, 8) spills 80-104
# bytes there with every flag on; the tile that passes, (32, 32, 8), halves K/V reuse and
# loses wgmma on sm_90.
HEADROOM_EXEMPT = {r"flash-(bf16|fp16)-D256-": (80, 90)}


def _check(res, arch, what):
    exempt = any(re.match(p, what) and arch in archs for p, archs in HEADROOM_EXEMPT.items())
    problems = compile_problems(res, MAX_SHARED[arch], headroom=not exempt)
    assert not problems, f"{what} sm_{arch}: " + "; ".join(problems)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["id"])
def test_shipped_config_compiles_without_spills(compiled, cfg, arch):
    _check(compiled[(cfg["id"], arch)], arch, cfg["id"])


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_runtime_specializations_compile(compiled, arch):
    results = [v for (key, a), v in compiled.items() if a == arch and key.startswith("special-")]
    assert len(results) == N_SPECIAL
    for i, res in enumerate(results):
        _check(res, arch, f"special-{i}")


def test_shipped_configs_cover_every_bucket():
    """Each dtype x BLOCK_D bucket x flag combination is listed once (the launcher side is
    checked in test_attention_triton.py::test_launchers_only_pick_shipped_configs)."""
    ta = triton_attention
    n = len(ta.DTYPES) * len(ta.BLOCK_D_BUCKETS)
    # the aligned tiles: 16-bit (2 dtypes) x their buckets x the prefill / decode flag sets
    aligned = 2 * (24 * len(ta._FLASH_ALIGNED_TILES) + 4 * len(ta._DECODE_ALIGNED_TILES))
    assert len(ta.SHIPPED_CONFIGS) == n * (24 + 4 + 1 + 1) + aligned + 2  # + the paged and varlen checks
    unaligned_twins = {c["id"] + "-aligned" for c in ta.SHIPPED_CONFIGS if not c["aligned_args"] and (
        c["id"].startswith(("flash-bf16-D128", "flash-fp16-D128")) or re.match(r"(decode|paged)1-(bf16|fp16)-D(64|128)-", c["id"]))}
    assert {c["id"] for c in ta.SHIPPED_CONFIGS if c["aligned_args"]} == unaligned_twins  # fmt: skip
    assert all(not c["constexprs"].get("DOT_FP32", False) for c in ta.SHIPPED_CONFIGS)
