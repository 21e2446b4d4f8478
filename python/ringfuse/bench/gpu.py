"""GPU bench (``ringfuse bench gpu``): ringfuse's CUDA ops beside torch's, on the same data,
in one process.

The limits are measured in the same run: the device copy bandwidth (256 MiB copied: read +
write) and the bf16 matmul rate (8192^3 ``a @ b``). Each case checks ringfuse's result
against an fp64 reference next to torch's own error (ARCHITECTURE.md's tolerance rule: at most 2x torch's
error plus a few fp32 ulps; "ok" column). It then times both sides with
``triton.testing.do_bench`` (CUDA events, medians), and reports the ratio and GB/s or
TFLOP/s as % of the measured limit. The host table times the Python and launch cost of
small calls: N calls queued without a sync, wall / N (issue target: torch's equivalent +
5 us). A case that raises is reported in its table and skipped. ``json_path`` gets every
row.

Napkin math for the % columns: norms move rows x hidden x elem x (2: x read, out written;
4 with a residual); the gated activations 3 x rows x d x elem (gate and up read, out
written; torch's two kernels move 5); decode attention reads K and V once (2 x B x Hkv x L x D x elem);
prefill does 4 x B x Hq x S^2 x D flops (half with causal); w8a16 reads N x K int8
weight bytes; w8a8 does 2 x M x N x K int8 ops.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..ops._common import CUDA_BACKENDS
from .harness import print_table

DEV = "cuda"
FP32_EPS = torch.finfo(torch.float32).eps


def _ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _err(got, ref) -> float:
    return (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0


def _ok(err: float, torch_err: float, ref) -> str:
    floor = 4 * FP32_EPS * max(ref.abs().max().item() if ref.numel() else 0.0, 1e-3)
    return "ok" if err <= 2 * torch_err + floor else "FAIL"


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.rows: list[dict] = []
        self.copy_gbps, self.bf16_tflops = _limits()

    def case(self, section: str, name: str, fn) -> None:
        """fn() -> dict of results; an exception becomes an error row."""
        try:
            row = fn()
        except Exception as e:  # report and go on: one broken case must not hide the others
            row = {"error": f"{type(e).__name__}: {e}"[:300], "where": traceback.format_exc().splitlines()[-3][-160:]}
        self.rows.append({"section": section, "case": name, **row})

    def pct_copy(self, nbytes: int, ms: float) -> float:
        return 100 * nbytes / ms / 1e6 / self.copy_gbps

    def bandwidth_row(self, ours, theirs, err: float, torch_err: float, ref, nbytes: int) -> dict:
        """Times both sides and reports a memory-bound case: the tolerance verdict, times,
        ratio, and GB/s as % of the copy bandwidth of this run."""
        t_ours, t_torch = _ms(ours), _ms(theirs)
        return {"ok": _ok(err, torch_err, ref), "us": t_ours * 1e3, "torch_us": t_torch * 1e3,
                "speedup": t_torch / t_ours, "gbps": nbytes / t_ours / 1e6, "pct": self.pct_copy(nbytes, t_ours)}

    # -----------------------------------------------------------------------------------
    def norms(self) -> None:
        shapes = [(8192, 4096), (2048, 576), (1, 4096)]
        saved = ops.cuda_backend()
        try:
            for backend in CUDA_BACKENDS:
                try:
                    ops.set_cuda_backend(backend)
                except ValueError:  # "cuda": _C was built without the CUDA C++ kernels
                    continue
                for shape in shapes:
                    for dt in (torch.bfloat16, torch.float32):
                        for op in ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"):
                            self.case("norms", f"{op}[{backend}] {list(shape)} {str(dt)[6:]}",
                                      lambda: self._norm(op, shape, dt))  # fmt: skip
        finally:
            ops.set_cuda_backend(saved)

    def _norm(self, op: str, shape, dt) -> dict:
        hidden = shape[1]
        x = torch.randn(*shape, device=DEV, dtype=dt)
        r = torch.randn(*shape, device=DEV, dtype=dt)
        w = torch.randn(hidden, device=DEV, dtype=dt)
        b = torch.randn(hidden, device=DEV, dtype=dt)
        if op == "rms_norm":
            ours, theirs, ref = (lambda: ops.rms_norm(x, w, 1e-6)), (lambda: F.rms_norm(x, (hidden,), w, 1e-6)), \
                F.rms_norm(x.double(), (hidden,), w.double(), 1e-6)  # fmt: skip
        elif op == "add_rms_norm":
            ours = lambda: ops.add_rms_norm(x, r, w, 1e-6)[0]  # noqa: E731
            theirs = lambda: F.rms_norm(x + r, (hidden,), w, 1e-6)  # noqa: E731
            ref = F.rms_norm(x.double() + r.double(), (hidden,), w.double(), 1e-6)
        elif op == "layer_norm":
            ours, theirs = (lambda: ops.layer_norm(x, w, b, 1e-5)), (lambda: F.layer_norm(x, (hidden,), w, b, 1e-5))
            ref = F.layer_norm(x.double(), (hidden,), w.double(), b.double(), 1e-5)
        else:
            ours = lambda: ops.add_layer_norm(x, r, w, b, 1e-5)[0]  # noqa: E731
            theirs = lambda: F.layer_norm(x + r, (hidden,), w, b, 1e-5)  # noqa: E731
            ref = F.layer_norm(x.double() + r.double(), (hidden,), w.double(), b.double(), 1e-5)
        nbytes = (4 if op.startswith("add") else 2) * x.numel() * x.element_size()
        return self.bandwidth_row(ours, theirs, _err(ours(), ref), _err(theirs(), ref), ref, nbytes)

    # -----------------------------------------------------------------------------------
    def activations(self) -> None:
        shapes = [(4096, 11008), (1, 11008)] if not self.quick else [(4096, 11008)]
        for op in ("silu_mul", "gelu_tanh_mul"):
            for rows, d in shapes:
                self.case("activations", f"{op} [{rows}, 2 x {d}] bf16", lambda: self._gated(op, rows, d))

    def _gated(self, op: str, rows: int, d: int) -> dict:
        x = torch.randn(rows, 2 * d, device=DEV, dtype=torch.bfloat16)
        act = F.silu if op == "silu_mul" else (lambda a: F.gelu(a, approximate="tanh"))
        ours, theirs = (lambda: getattr(ops, op)(x)), (lambda: act(x[:, :d]) * x[:, d:])
        ref = act(x[:, :d].double()) * x[:, d:].double()
        nbytes = 3 * rows * d * x.element_size()  # gate and up read, out written
        return self.bandwidth_row(ours, theirs, _err(ours(), ref), _err(theirs(), ref), ref, nbytes)

    # -----------------------------------------------------------------------------------
    def prefill(self) -> None:
        cases = [(4, 32, 8, 2048, 128, True), (4, 32, 8, 2048, 128, False), (1, 32, 8, 8192, 128, True),
                 (8, 9, 3, 2048, 64, True), (2, 32, 8, 4096, 64, False)]  # fmt: skip
        for b, hq, hkv, s, d, causal in cases[:2] if self.quick else cases:
            self.case("prefill", f"B{b} H{hq}/{hkv} S{s} D{d} {'causal' if causal else 'full'} bf16",
                      lambda: self._prefill(b, hq, hkv, s, d, causal))  # fmt: skip

    def _prefill(self, b, hq, hkv, s, d, causal) -> dict:
        q = torch.randn(b, hq, s, d, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(b, hkv, s, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(b, hkv, s, d, device=DEV, dtype=torch.bfloat16)
        ours = lambda: ops.attention(q, k, v, causal=causal)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # noqa: E731
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True)
        err, torch_err = _err(ours(), ref), _err(theirs(), ref)
        t_ours, t_torch = _ms(ours), _ms(theirs)
        flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
        return {"ok": _ok(err, torch_err, ref), "us": t_ours * 1e3, "torch_us": t_torch * 1e3,
                "speedup": t_torch / t_ours, "tflops": flops / t_ours / 1e9,
                "pct": 100 * flops / t_ours / 1e9 / self.bf16_tflops}

    # -----------------------------------------------------------------------------------
    def decode(self) -> None:
        cases = [(1, 32, 8, 4096, 128), (32, 32, 8, 4096, 128), (1, 32, 8, 32768, 128), (64, 9, 3, 2048, 64),
                 (8, 32, 8, 16384, 128)]  # fmt: skip
        for b, hq, hkv, ctx, d in cases[:2] if self.quick else cases:
            for paged in (False, True):
                self.case("decode", f"{'paged ' if paged else ''}B{b} H{hq}/{hkv} L{ctx} D{d} bf16",
                          lambda: self._decode(b, hq, hkv, ctx, d, paged))  # fmt: skip

    def _decode(self, b, hq, hkv, ctx, d, paged) -> dict:
        q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(b, hkv, ctx, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(b, hkv, ctx, d, device=DEV, dtype=torch.bfloat16)
        lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
        if paged:  # the same keys scattered over shuffled 16-key pages
            bs, nb = 16, ctx // 16
            table = torch.randperm(b * nb, device=DEV, dtype=torch.int32).view(b, nb)
            kp = torch.empty(b * nb, hkv, bs, d, device=DEV, dtype=torch.bfloat16)
            vp = torch.empty_like(kp)
            kp[table.long()] = k.view(b, hkv, nb, bs, d).transpose(1, 2)
            vp[table.long()] = v.view(b, hkv, nb, bs, d).transpose(1, 2)
            ours = lambda: ops.paged_decode_attention(q, kp, vp, table, lens)  # noqa: E731
        else:
            ours = lambda: ops.decode_attention(q, k, v, lens)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)  # noqa: E731
        ref = F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float(), v.float(), enable_gqa=True).squeeze(2)
        nbytes = 2 * k.numel() * k.element_size()
        row = self.bandwidth_row(ours, theirs, _err(ours(), ref), _err(theirs().squeeze(2), ref), ref, nbytes)
        ops.check_device_errors()
        return row

    # -----------------------------------------------------------------------------------
    # Not in the default run (--sections tune): the decode stage-1 tiles and split target,
    # each candidate timed on the same data, for the next change of kernels/attention.py's
    # _DECODE_ALIGNED_TILES (what these packed caches take) / DECODE_TARGET_PROGRAMS. A
    # candidate replaces the table entry for the run and is restored after it; those the
    # compile test has not checked may spill.
    TUNE_TILES = ((32, 4), (64, 4), (16, 4), (16, 8), (32, 8), (64, 8))  # (BLOCK_N, num_warps), 16-bit D 128
    TUNE_TARGETS = (128, 256, 512, 1024)
    TUNE_CASES = ((1, 4096), (1, 32768), (32, 4096), (8, 16384))  # (B, context), Llama-3-8B heads 32 / 8, D 128

    def tune(self) -> None:
        from ..kernels import attention as ta

        tiles = ta._DECODE_ALIGNED_TILES
        saved_tile, saved_target = tiles[(True, 128)], ta.DECODE_TARGET_PROGRAMS
        try:
            for tile in self.TUNE_TILES:
                for target in self.TUNE_TARGETS if tile == saved_tile else (saved_target,):
                    tiles[(True, 128)], ta.DECODE_TARGET_PROGRAMS = tile, target
                    ta._decode_plan.cache_clear()
                    for b, ctx in self.TUNE_CASES:
                        for paged in (False, True):
                            name = (f"BLOCK_N {tile[0]} warps {tile[1]} target {target}: "
                                    f"{'paged ' if paged else ''}B{b} L{ctx}")  # fmt: skip
                            self.case("tune", name, lambda: self._decode(b, 32, 8, ctx, 128, paged))
        finally:
            tiles[(True, 128)], ta.DECODE_TARGET_PROGRAMS = saved_tile, saved_target
            ta._decode_plan.cache_clear()
        self._tune_norm_warps()

    # The Triton norms' warps per row (kernels/_norm_common.pick: 8 elements per thread up
    # to 16 warps), each count timed against torch on the same data.
    TUNE_NORM_WARPS = {(8192, 4096): (4, 8, 16), (2048, 576): (1, 2, 4)}  # shape: counts (BLOCK 4096 / 1024)

    def _tune_norm_warps(self) -> None:
        from ..kernels import layer_norm as tln
        from ..kernels import rms_norm as trn

        picks = {mod: mod.pick for mod in (trn, tln)}  # _norm_common.pick, as each launcher module calls it
        saved = ops.cuda_backend()
        ops.set_cuda_backend("triton")
        try:
            for shape, counts in self.TUNE_NORM_WARPS.items():
                for nw in counts:
                    for mod, pick in picks.items():  # the launchers' kernel and BLOCK, this warp count
                        mod.pick = lambda n, row, looped, nw=nw, pick=pick: (*pick(n, row, looped)[:2], nw)
                        mod._plan.cache_clear()
                    for op in ("rms_norm", "add_rms_norm", "layer_norm"):
                        self.case("tune", f"norm warps {nw}: {op} {list(shape)} bf16",
                                  lambda: self._norm(op, shape, torch.bfloat16))  # fmt: skip
        finally:
            for mod, pick in picks.items():
                mod.pick = pick
                mod._plan.cache_clear()
            ops.set_cuda_backend(saved)

    # -----------------------------------------------------------------------------------
    def int8(self) -> None:
        gemm = [(4096, 4096, 4096), (8192, 8192, 8192), (1024, 4096, 4096), (256, 4096, 4096), (32, 4096, 11008)]
        for m, k, n in gemm[:2] if self.quick else gemm:
            self.case("int8", f"w8a8 M{m} K{k} N{n} -> bf16", lambda: self._w8a8(m, k, n))
        w8a16 = [(1, 4096, 4096), (16, 4096, 11008), (1, 8192, 28672), (64, 4096, 4096), (256, 4096, 4096)]
        for m, k, n in w8a16[:2] if self.quick else w8a16:
            self.case("int8", f"w8a16 M{m} K{k} N{n} bf16", lambda: self._w8a16(m, k, n))

    def _w8a8(self, m, k, n) -> dict:
        a = torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8)
        sa, sb = torch.rand(m, device=DEV) + 0.5, torch.rand(n, device=DEV) + 0.5
        exact = torch._int_mm(a, b.t()) if m > 16 else (a.double() @ b.double().t()).to(torch.int32)
        if not torch.equal(ops.int8_gemm(a, b, out_dtype=torch.int32), exact):
            raise AssertionError("the int32 product is not exact")
        ours = lambda: ops.int8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16)  # noqa: E731
        ref = exact.double() * sa.double()[:, None] * sb.double()[None, :]
        got = ours()
        bt = b.t()
        t_ours = _ms(ours)
        t_torch = _ms(lambda: torch._int_mm(a, bt)) if m > 16 else math.nan  # _int_mm needs M > 16
        tops = 2 * m * n * k / t_ours / 1e9
        within = bool(((got.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-30).all())  # one bf16 rounding
        return {"ok": "ok" if within else "FAIL", "us": t_ours * 1e3,
                "torch_us": t_torch * 1e3, "speedup": t_torch / t_ours, "tflops": tops,
                "pct": 100 * tops / (2 * self.bf16_tflops), "baseline": "torch._int_mm (int32 out)"}  # fmt: skip

    def _w8a16(self, m, k, n) -> dict:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        wq = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8)
        ws = torch.rand(n, device=DEV) * 0.01 + 0.001
        w_bf16 = (wq.float() * ws[:, None]).to(torch.bfloat16)
        ours = lambda: ops.int8_weight_only_linear(x, wq, ws)  # noqa: E731
        theirs = lambda: F.linear(x, w_bf16)  # noqa: E731
        ref = x.double() @ (wq.double() * ws.double()[:, None]).t()
        nbytes = wq.numel() + x.numel() * 2
        return {**self.bandwidth_row(ours, theirs, _err(ours(), ref), _err(theirs(), ref), ref, nbytes),
                "baseline": "F.linear, bf16 weight"}

    # -----------------------------------------------------------------------------------
    def host(self) -> None:
        """Host time per small call, ringfuse vs the torch equivalent (target: + 5 us)."""
        x, r = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16), torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
        gate_up = torch.randn(1, 2 * 11008, device=DEV, dtype=torch.bfloat16)
        q, k = torch.randn(1, 32, 128, device=DEV, dtype=torch.bfloat16), torch.randn(1, 8, 128, device=DEV, dtype=torch.bfloat16)
        positions = torch.tensor([100], device=DEV)
        cache = ops.cos_sin_cache(4096, 128).to(DEV)
        kc = torch.randn(64, 8, 16, 128, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        slots = torch.tensor([5], device=DEV)
        table = torch.arange(64, device=DEV, dtype=torch.int32).view(1, 64)
        lens = torch.tensor([1000], device=DEV, dtype=torch.int32)
        wq = torch.randint(-127, 128, (4096, 4096), device=DEV, dtype=torch.int8)
        ws = torch.rand(4096, device=DEV)
        w_bf16 = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)
        half = 64
        cos, sin = cache[positions, :half], cache[positions, half:]

        def torch_rope(t=q):  # fp32 math, back to t's dtype
            t1, t2 = t[..., :half], t[..., half:]
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1).to(t.dtype)

        kv_sdpa = kc[:8].reshape(1, 8, 128, 128)  # [1, Hkv, 128 keys, D]: torch's decode over contiguous keys
        plan = ops.PagedDecodePlan(kc, vc, cache, positions, slots, table, lens, 32)

        def torch_decode_step():  # rotary, the new k / v rows, attention: what one plan run does
            rq, rk = torch_rope(q), torch_rope(k)
            kc.view(-1, 128).index_copy_(0, slots, rk[:, 0])
            vc.view(-1, 128).index_copy_(0, slots, k[:, 0])
            return F.scaled_dot_product_attention(rq.unsqueeze(2), kv_sdpa, kv_sdpa, enable_gqa=True)

        pairs = {
            "rms_norm [1, 4096]": (lambda: ops.rms_norm(x, w, 1e-6), lambda: F.rms_norm(x, (4096,), w, 1e-6)),
            "add_rms_norm [1, 4096]": (lambda: ops.add_rms_norm(x, r, w, 1e-6),
                                       lambda: F.rms_norm(x + r, (4096,), w, 1e-6)),
            "layer_norm [1, 4096]": (lambda: ops.layer_norm(x, w, w, 1e-5),
                                     lambda: F.layer_norm(x, (4096,), w, w, 1e-5)),
            "rotary 32/8 heads": (lambda: ops.rotary_embedding(q, k, positions, cache), torch_rope),
            "write_kv 1 token": (lambda: ops.write_kv(k, k, kc, vc, slots),  # torch: one index_copy_ per cache
                                 lambda: (kc.view(-1, 128).index_copy_(0, slots, k[:, 0]),
                                          vc.view(-1, 128).index_copy_(0, slots, k[:, 0]))),
            "silu_mul [1, 11008]": (lambda: ops.silu_mul(gate_up),
                                    lambda: F.silu(gate_up[:, :11008]) * gate_up[:, 11008:]),
            "paged decode L1000": (lambda: ops.paged_decode_attention(q, kc, vc, table, lens),
                                   lambda: F.scaled_dot_product_attention(q.unsqueeze(2), kv_sdpa, kv_sdpa,
                                                                          enable_gqa=True)),
            "decode plan run (rotary, write_kv, paged decode)": (lambda: plan.run(q, k, k, kc, vc), torch_decode_step),
            "w8a16 M1 4096x4096": (lambda: ops.int8_weight_only_linear(x, wq, ws), lambda: F.linear(x, w_bf16)),
        }  # fmt: skip
        for name, (ours, theirs) in pairs.items():
            self.case("host", name, lambda: {"host_us": _host_us(ours), "torch_host_us": _host_us(theirs)})
        ops.check_device_errors()

    # -----------------------------------------------------------------------------------
    def report(self, json_path: str | None) -> int:
        title = (f"ringfuse bench gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}; "
                 f"copy {self.copy_gbps:,.0f} GB/s, bf16 matmul {self.bf16_tflops:,.0f} TFLOP/s (same run)")  # fmt: skip
        print(title)
        for section in ("norms", "activations", "prefill", "decode", "int8", "tune"):
            rows = [self._cells(r) for r in self.rows if r["section"] == section]
            if rows:
                print_table(f"{section} (ratio: torch time / ringfuse time)",
                            ["case", "ok", "ringfuse us", "torch us", "ratio", "rate", "% of limit"], rows, left=2)
        host = [r for r in self.rows if r["section"] == "host"]
        if host:
            print_table("host time per call (queued, no sync), target: torch + 5 us",
                        ["call", "ringfuse us", "torch us", "within +5 us"],
                        [[r["case"], "error", r["error"][:60], ""] if "error" in r else
                         [r["case"], f"{r['host_us']:.1f}", f"{r['torch_host_us']:.1f}",
                          "yes" if r["host_us"] <= r["torch_host_us"] + 5 else "no"] for r in host], left=1)  # fmt: skip
        if json_path:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "copy_gbps": self.copy_gbps, "bf16_tflops": self.bf16_tflops,
                                        "rows": self.rows}, indent=1))  # fmt: skip
            print(f"wrote {path}")
        return 1 if any("error" in r or r.get("ok") == "FAIL" for r in self.rows) else 0

    @staticmethod
    def _cells(r: dict) -> list[str]:
        if "error" in r:
            return [r["case"], "error", r["error"][:70], "", "", "", ""]
        rate = f"{r['gbps']:,.0f} GB/s" if "gbps" in r else f"{r['tflops']:,.0f} TFLOP/s"
        torch_us = "-" if math.isnan(r["torch_us"]) else f"{r['torch_us']:,.1f}"
        ratio = "-" if math.isnan(r["speedup"]) else f"{r['speedup']:.2f}x"
        return [r["case"], r["ok"], f"{r['us']:,.1f}", torch_us, ratio, rate, f"{r['pct']:.0f}%"]


def copy_gbps(device=DEV) -> float:
    """The device's copy bandwidth now: 256 MiB read + written, GB/s."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / _ms(lambda: y.copy_(x)) / 1e6


def _limits() -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s: 8192^3), measured now."""
    copy = copy_gbps()
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    return copy, 2 * 8192**3 / _ms(lambda: a @ b) / 1e9


def _host_us(fn, n: int = 200) -> float:
    """Host microseconds per call: n calls queued back to back (no sync inside), after a
    warm-up; the device may still be running when the clock stops."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return host * 1e6


SECTIONS = ("norms", "activations", "prefill", "decode", "int8", "host")  # the default run
EXTRA_SECTIONS = ("tune",)


def run(quick: bool = False, json_path: str | None = None, sections=SECTIONS) -> int:
    if not torch.cuda.is_available():
        print("ringfuse bench gpu: needs a CUDA device (torch.cuda.is_available() is False)")
        return 2
    bench = Bench(quick)
    for section in sections:
        getattr(bench, section)()
    return bench.report(json_path)
