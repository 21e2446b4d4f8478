"""Every shipped Triton config compiles for real GPUs (sm_80, sm_90) without a device and
spills nothing (ARCHITECTURE.md, "GPU code without a GPU").

The launchers can choose 364 (rms_norm) + 560 (layer_norm) variants: x dtype x out dtype x
weight/bias dtype x options x BLOCK bucket. Compiling all of them for two archs takes
~3 minutes on the 2-core dev VM (RINGFUSE_COMPILE_ALL=1 does; last full run: 0 spills
anywhere, at most 104 registers, in ln_row BLOCK 8192 with 16 warps, of the 128 allowed).
By default each (kernel, BLOCK, num_warps, x dtype) is compiled in two variants: every
option on with fp32 side tensors (out, weight, bias), and every option on with side
tensors in x's dtype (the usual production call); ~15 s with a cold Triton cache.

The tests run under the Triton interpreter, which cannot compile for a GPU, so all compiles
happen in one child process without TRITON_INTERPRET (`python -m
ringfuse.kernels.compile_check`), and the tests check its results.
"""

from __future__ import annotations

import os

import pytest
import torch

from .triton_helpers import compile_in_child, compile_problems

from ringfuse.kernels import compile_check
from ringfuse.kernels import layer_norm as triton_layer_norm
from ringfuse.kernels import rms_norm as triton_rms_norm

ARCHS = (80, 90)
MODULES = (triton_rms_norm, triton_layer_norm)
COMPILE_ALL = os.environ.get("RINGFUSE_COMPILE_ALL") == "1"


def _representative(configs):
    """Per (kernel, BLOCK, num_warps, x dtype): every option on (the most flags true; for
    fp32 x, llama_cast is folded into the torch mode) with fp32 side tensors (out, weight,
    bias), and the same with side tensors in x's dtype."""
    picked = {}
    for cfg in configs:
        sig, cexp = cfg["signature"], cfg["constexprs"]
        xt = sig["x_ptr"]
        side = [sig["out_ptr"], sig["w_ptr"]] + ([sig["b_ptr"]] if "b_ptr" in sig else [])
        n_on = sum(bool(v) for k, v in cexp.items() if k != "BLOCK")
        for flavor, want in (("wide", "*fp32"), ("native", xt)):
            key = (cfg["kernel"].__name__, cexp["BLOCK"], cfg["num_warps"], xt, flavor)
            if all(t == want for t in side) and n_on > picked.get(key, (-1, None))[0]:
                picked[key] = (n_on, cfg)
    return list({cfg["id"]: cfg for _, cfg in picked.values()}.values())  # fp32 x: one config


CONFIGS = [
    cfg for mod in MODULES for cfg in (mod.SHIPPED_CONFIGS if COMPILE_ALL else _representative(mod.SHIPPED_CONFIGS))
]


def _job(mod, kernel, sig, cexp, arch, nw, attrs=None) -> dict:
    return {"module": mod.__name__.rsplit(".", 1)[-1], "kernel": kernel.__name__, "signature": sig,
            "constexprs": cexp, "arch": arch, "num_warps": nw, "attrs": attrs}


def _module_of(cfg):
    return triton_rms_norm if cfg in triton_rms_norm.SHIPPED_CONFIGS else triton_layer_norm


def _spec_all_options_bf16(mod, n_cols):
    bf = torch.bfloat16
    if mod is triton_rms_norm:
        return mod._spec(bf, bf, bf, True, True, n_cols)  # weight, residual, llama_cast
    return mod._spec(bf, bf, bf, bf, True, n_cols)  # weight, bias, residual


def _specialization_jobs(mod, arch):
    """Variants Triton's JIT derives at launch from argument values: ints == 1 become
    constexprs (hidden 1, one row: n_cols and every row stride), ints divisible by 16 get
    tt.divisibility (the vectorized variant), and row strides >= 2**31 are i64."""
    kernel, sig, cexp, nw = _spec_all_options_bf16(mod, 1)
    ints = [k for k, v in sig.items() if v == "i32"]
    sig1 = {k: ("constexpr" if k in ints else v) for k, v in sig.items()}
    jobs = [_job(mod, kernel, sig1, {**cexp, **{k: 1 for k in ints}}, arch, nw)]
    for n_cols in (mod.MAX_ROW_BLOCK, 2 * mod.MAX_ROW_BLOCK):  # the widest row kernel, the looped one
        kernel, sig, cexp, nw = _spec_all_options_bf16(mod, n_cols)
        # pointers and ints divisible by 16 (eps, the one fp32 argument, never is)
        aligned = [[i, [["tt.divisibility", 16]]] for i, a in enumerate(sig) if sig[a] not in ("constexpr", "fp32")]
        jobs.append(_job(mod, kernel, sig, cexp, arch, nw, aligned))
        jobs.append(_job(mod, kernel, {k: ("i64" if k.endswith("stride") else v) for k, v in sig.items()},
                         cexp, arch, nw))
    return jobs


@pytest.fixture(scope="module")
def compiled():
    """{job key: result} for every shipped config and runtime specialization, both archs,
    compiled in one child process with the interpreter off."""
    jobs, keys = [], []
    for cfg in CONFIGS:
        for arch in ARCHS:
            jobs.append(_job(_module_of(cfg), cfg["kernel"], cfg["signature"], cfg["constexprs"], arch,
                             cfg["num_warps"]))
            keys.append((cfg["id"], arch))
    for mod in MODULES:
        for arch in ARCHS:
            spec = _specialization_jobs(mod, arch)
            jobs += spec
            keys += [(f"{mod.__name__}-special-{i}", arch) for i in range(len(spec))]
    return dict(zip(keys, compile_in_child(compile_check.__name__, jobs)))


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["id"])
def test_shipped_config_compiles_without_spills(compiled, cfg, arch):
    res = compiled[(cfg["id"], arch)]
    problems = compile_problems(res)
    if res["approx_ops"]:  # rstd is correctly rounded (tl.div_rn / tl.sqrt_rn), as on the CPU
        problems.append(f"approximate fp32 math {res['approx_ops']}")
    assert not problems, f"{cfg['id']} sm_{arch}: " + "; ".join(problems)


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_launcher_only_picks_shipped_configs(mod):
    """Whatever the launcher picks for any hidden size is in SHIPPED_CONFIGS."""
    shipped = {
        (c["kernel"].__name__, tuple(c["signature"].items()), tuple(c["constexprs"].items()), c["num_warps"])
        for c in mod.SHIPPED_CONFIGS
    }
    assert len(shipped) == len(mod.SHIPPED_CONFIGS)
    sizes = [1, 2, 7, 64, 255, 256, 257, 577, 1000, 2048, 4095, 4096, 5120, 8191, 8192, 8193, 16384, 65536, 100003]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for n_cols in sizes:
        for x_dt in dtypes:
            for out_dt in (x_dt, torch.float32):
                for p_dt in (None, x_dt, torch.float32):
                    for res in (False, True):
                        if mod is triton_rms_norm:
                            specs = [mod._spec(x_dt, out_dt, p_dt, res, llama, n_cols) for llama in (False, True)]
                        else:
                            specs = [mod._spec(x_dt, out_dt, p_dt, b_dt, res, n_cols) for b_dt in (None, x_dt)]
                        for kernel, sig, cexp, nw in specs:
                            assert (kernel.__name__, tuple(sig.items()), tuple(cexp.items()), nw) in shipped, (
                                n_cols, x_dt, cexp,
                            )  # fmt: skip
    # the buckets: row kernel up to MAX_ROW_BLOCK, looped above
    assert mod._pick(mod.MAX_ROW_BLOCK)[1] == mod.MAX_ROW_BLOCK
    assert mod._pick(mod.MAX_ROW_BLOCK + 1)[1] == mod.LOOP_BLOCK
    assert mod._pick(1)[1] == mod.MIN_BLOCK


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_runtime_specializations_compile(compiled, mod, arch):
    """hidden 1 / one row (ints as constexpr 1), 16-divisible ints and pointers, i64 strides."""
    results = [v for (key, a), v in compiled.items() if a == arch and key.startswith(f"{mod.__name__}-special-")]
    assert len(results) == 5
    for res in results:
        problems = compile_problems(res)
        assert not problems, f"{res['name']} sm_{arch}: " + "; ".join(problems)


def test_compile_for_target_rejects_interpreted_kernels():
    """Under the interpreter @triton.jit gives InterpretedFunctions: a clear error that says
    how to compile instead (a child process without TRITON_INTERPRET, as the fixture does)."""
    from triton.runtime.jit import JITFunction

    kernel = triton_rms_norm._rms_norm_fwd_row_kernel
    if isinstance(kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET is off in this process: kernels are compilable here")
    _, sig, cexp, nw = triton_rms_norm._spec(torch.float16, torch.float16, None, False, False, 577)
    with pytest.raises(TypeError, match="python -m ringfuse.kernels.compile_check"):
        compile_check.compile_for_target(kernel, sig, cexp, 80, nw)
