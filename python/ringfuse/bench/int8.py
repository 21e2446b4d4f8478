"""int8 benches vs torch eager, measured in the same run.

- quantize_per_token vs the same formula in torch ops (amax, divide, round, clamp, cast),
  for the activation shapes of a W8A8 linear layer: M tokens x K in {576, 1536, 4096}. GB/s
  counts x read once, int8 written once and the scales; % is of the copy bandwidth.
- int8_gemm (pre-quantized a, prepacked b, fp32 output with scales) vs fp32 F.linear and
  torch._int_mm, for M in {1, 4, 16, 64, 256} and (K, N) of SmolLM2 and Llama-7B layers.
  GOPS counts 2 M N K; % is of the int8 dot peak measured in this run on the kernel's path
  (``bench limits``: vpdpbusd zmm on AVX-512 VNNI hosts, else vpmaddubsw + vpmaddwd).
- int8_weight_only_linear (fp32 activations, int8 weights in memory) vs fp32 and bf16
  F.linear and torch.ao's dynamic quantized Linear at decode sizes M in {1, 4, 16}: GB/s
  counts the int8 weight bytes read once; % is of the DRAM read bandwidth measured in this
  run. The weights of every layer are cycled so each call reads them from DRAM.
- Int8Linear (the module: quantizing activations included, path chosen by M) in both
  modes vs fp32 / bf16 F.linear and torch.ao's dynamic quantized Linear with per-channel
  weights (``per_channel_dynamic_qconfig``: the per-tensor default ruins real models), warm
  weights, M in {1, 4, 16, 64, 256}.
"""

from __future__ import annotations

import torch

import copy
import warnings

from .. import nn, ops
from . import limits as limits_mod
from .harness import compare, fmt_us, print_table

ROWS = [1, 16, 256, 2048]
KS = [576, 1536, 4096]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _torch_quantize(x):
    scale = x.float().abs().amax(-1, keepdim=True) / 127
    q = torch.round(x.float() / scale.clamp(min=1e-30)).clamp(-127, 127).to(torch.int8)
    return q, scale


def run(rows=ROWS, ks=KS, dtypes=tuple(DTYPES), rounds: int = 7, lim=None):
    lim = lim or limits_mod.measure()
    table, results = [], []
    for m in rows:
        for k in ks:
            for dt in dtypes:
                x = torch.randn(m, k).to(DTYPES[dt])  # [M, K] activations
                t = compare({"torch": lambda: _torch_quantize(x), "ringfuse": lambda: ops.quantize_per_token(x)},
                            rounds=rounds)  # fmt: skip
                ours, base = t["ringfuse"].median_s, t["torch"].median_s
                nbytes = x.numel() * (x.element_size() + 1) + m * 4
                gbs = nbytes / ours / 1e9
                results.append(dict(op="quantize_per_token", m=m, k=k, dtype=dt, torch_s=base, ringfuse_s=ours,
                                    speedup=base / ours, gbs=gbs))
                table.append([f"M={m}", f"K={k}", dt, fmt_us(base), fmt_us(ours), f"{base / ours:.2f}x", f"{gbs:.1f}",
                              f"{100 * gbs / lim.copy_gbs:.0f}%"])
    print_table(f"quantize_per_token vs torch eager, {lim.threads} threads, {lim.isa}",
                ["rows", "K", "dtype", "torch us", "ringfuse us", "speedup", "GB/s", "% copy bw"], table,
                note=f"median of interleaved rounds; copy bandwidth measured in this run: {lim.copy_gbs:.1f} GB/s.")
    return results


GEMM_MS = [1, 4, 16, 64, 256]
GEMM_KN = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008)]


def dynamic_quantized(linear: torch.nn.Linear) -> torch.nn.Module:
    """torch.ao's dynamic int8 Linear (fbgemm / oneDNN) with per-channel weights."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)  # fmt: skip


def run_gemm(ms=GEMM_MS, kns=GEMM_KN, rounds: int = 5, lim=None):
    lim = lim or limits_mod.measure()
    int8_peak = lim.int8_gops
    table, results = [], []
    for k, n in kns:
        w = torch.randn(n, k)  # [N, K] fp32 weight
        w_q, w_s = ops.quantize_per_token(w)
        packed = ops.pack_int8_weight(w_q)
        for m in ms:
            x = torch.randn(m, k)  # [M, K]
            x_q, x_s = ops.quantize_per_token(x)
            fns = {"fp32 linear": lambda: torch.nn.functional.linear(x, w),
                   "ringfuse": lambda: ops.int8_gemm(x_q, w_q, x_s, w_s, packed=packed)}  # fmt: skip
            if m >= 17:  # torch._int_mm wants M > 16 on CPU
                fns["torch._int_mm"] = lambda: torch._int_mm(x_q, w_q.t())
            t = compare(fns, rounds=rounds)
            ours, base = t["ringfuse"].median_s, t["fp32 linear"].median_s
            gops = 2 * m * n * k / ours / 1e9
            int_mm = t["torch._int_mm"].median_s if "torch._int_mm" in t else None
            results.append(dict(op="int8_gemm", m=m, k=k, n=n, fp32_s=base, ringfuse_s=ours, speedup=base / ours,
                                int_mm_s=int_mm, gops=gops, peak_frac=gops / int8_peak))
            table.append([f"M={m}", f"K={k} N={n}", fmt_us(base), fmt_us(int_mm) if int_mm else "-", fmt_us(ours),
                          f"{base / ours:.2f}x", f"{gops:.0f}", f"{100 * gops / int8_peak:.0f}%"])
    print_table(f"int8_gemm (W8A8, fp32 out) vs fp32 F.linear, {lim.threads} threads, {lim.isa}",
                ["M", "K, N", "fp32 linear us", "_int_mm us", "ringfuse us", "vs fp32", "GOPS", "% int8 peak"],
                table, left=2,
                note=f"int8 dot peak measured in this run on the {limits_mod.int8_path()} path: {int8_peak:.0f} GOPS; "
                     "activations pre-quantized, weights prepacked (the quantized layer does both once).")
    return results


WO_MS = [1, 4, 16]


def run_weight_only(ms=WO_MS, kns=GEMM_KN, rounds: int = 5, lim=None):
    lim = lim or limits_mod.measure()
    table, results = [], []
    for k, n in kns:
        copies = max(2, (256 << 20) // (n * k))  # int8 copies cycled: cold weights, as in a model
        ws = [torch.randn(n, k) for _ in range(2)]
        w_q, w_s = ops.quantize_per_token(ws[0])
        q_copies = [w_q.clone() for _ in range(copies)]
        f_copies = [ws[i % 2] for i in range(max(2, copies // 4))]  # fp32: 4x the bytes per copy
        b_copies = [w.bfloat16() for w in f_copies]
        linear = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            linear.weight.copy_(ws[0])
        d_copies = [dynamic_quantized(copy.deepcopy(linear)) for _ in range(copies)]  # int8 inside, as ours
        for m in ms:
            x = torch.randn(m, k)
            it = {"q": 0, "f": 0, "b": 0, "d": 0}

            def nxt(key, pool):
                it[key] = (it[key] + 1) % len(pool)
                return pool[it[key]]

            t = compare({"fp32 linear": lambda: torch.nn.functional.linear(x, nxt("f", f_copies)),
                         "bf16 linear": lambda: torch.nn.functional.linear(x.bfloat16(), nxt("b", b_copies)),
                         "dynamic quantized": lambda: nxt("d", d_copies)(x),
                         "ringfuse": lambda: ops.int8_weight_only_linear(x, nxt("q", q_copies), w_s)},
                        rounds=rounds)  # fmt: skip
            ours, base, dyn = t["ringfuse"].median_s, t["fp32 linear"].median_s, t["dynamic quantized"].median_s
            gbs = n * k / ours / 1e9
            results.append(dict(op="int8_weight_only_linear", m=m, k=k, n=n, fp32_s=base, ringfuse_s=ours,
                                dynamic_s=dyn, speedup=base / ours, vs_dynamic=dyn / ours, gbs=gbs,
                                bw_frac=gbs / lim.read_gbs))  # fmt: skip
            table.append([f"M={m}", f"K={k} N={n}", fmt_us(base), fmt_us(t["bf16 linear"].median_s), fmt_us(dyn),
                          fmt_us(ours), f"{base / ours:.2f}x", f"{dyn / ours:.2f}x", f"{gbs:.1f}",
                          f"{100 * gbs / lim.read_gbs:.0f}%"])  # fmt: skip
    print_table(f"int8_weight_only_linear (W8A32) vs F.linear, cold weights, {lim.threads} threads, "
                f"{limits_mod.wide_path()}",
                ["M", "K, N", "fp32 linear us", "bf16 linear us", "dyn quant us", "ringfuse us", "vs fp32",
                 "vs dyn quant", "weight GB/s", "% DRAM read"], table, left=2,
                note=f"DRAM read bandwidth measured in this run: {lim.read_gbs:.1f} GB/s."
                     + limits_mod.torch_quantized_isa_note())
    return results


LINEAR_MS = [1, 4, 16, 64, 256]


def run_linear(ms=LINEAR_MS, kns=GEMM_KN, rounds: int = 5, lim=None):
    """The modules as a model uses them: Int8Linear (w8a8, w8a16) vs the float layer and
    torch.ao's dynamic quantized Linear, on the same weights (warm: every call the same layer)."""
    lim = lim or limits_mod.measure()
    table, results = [], []
    for k, n in kns:
        linear = torch.nn.Linear(k, n)
        layer_bf16 = copy.deepcopy(linear).bfloat16()
        dyn = dynamic_quantized(copy.deepcopy(linear))
        w8a8, w8a16 = nn.Int8Linear.from_float(linear, "w8a8"), nn.Int8Linear.from_float(linear, "w8a16")
        for m in ms:
            x = torch.randn(m, k)  # [M, K]
            xb = x.bfloat16()
            with torch.no_grad():
                t = compare({"fp32 linear": lambda: linear(x), "bf16 linear": lambda: layer_bf16(xb),
                             "dynamic quantized": lambda: dyn(x), "w8a8": lambda: w8a8(x),
                             "w8a16": lambda: w8a16(x)}, rounds=rounds)  # fmt: skip
            base, d = t["fp32 linear"].median_s, t["dynamic quantized"].median_s
            a8, a16 = t["w8a8"].median_s, t["w8a16"].median_s
            results.append(dict(op="Int8Linear", m=m, k=k, n=n, fp32_s=base, dynamic_s=d, w8a8_s=a8, w8a16_s=a16,
                                speedup=base / max(a8, a16), w8a8_vs_dynamic=d / a8, w8a16_vs_fp32=base / a16))
            table.append([f"M={m}", f"K={k} N={n}", fmt_us(base), fmt_us(t["bf16 linear"].median_s), fmt_us(d),
                          fmt_us(a8), f"{base / a8:.2f}x", f"{d / a8:.2f}x", fmt_us(a16), f"{base / a16:.2f}x",
                          f"{d / a16:.2f}x", f"{100 * 2 * m * n * k / a8 / 1e9 / lim.int8_gops:.0f}%"])  # fmt: skip
    print_table(f"Int8Linear modules vs float and torch.ao dynamic quantized Linear, {lim.threads} threads, "
                f"int8 path {limits_mod.int8_path()}",
                ["M", "K, N", "fp32 us", "bf16 us", "dyn quant us", "w8a8 us", "w8a8 vs fp32", "w8a8 vs dyn",
                 "w8a16 us", "w8a16 vs fp32", "w8a16 vs dyn", "w8a8 % int8 peak"], table, left=2,
                note="fp32 input; the layers include activation quantization, bias and output; warm weights. "
                     f"int8 dot peak: {lim.int8_gops:.0f} GOPS." + limits_mod.torch_quantized_isa_note())  # fmt: skip
    return results
