"""``ringfuse bench gpu``: refuses cleanly without a device, reports a broken case instead of
stopping, flags results outside ARCHITECTURE.md's tolerance; on a GPU (quick mode) every case runs
and the JSON holds every row."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ringfuse import cli, ops
from ringfuse.bench import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_device_it_says_so_and_exits_2(capsys):
    assert cli.main(["bench", "gpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out


def test_a_failing_case_becomes_an_error_row():
    bench = object.__new__(gpu.Bench)  # no limits to measure here
    bench.rows = []
    bench.case("decode", "broken", lambda: 1 / 0)
    bench.case("decode", "fine", lambda: {"ok": "ok", "us": 10.0, "torch_us": 20.0, "speedup": 2.0, "gbps": 100.0,
                                          "pct": 50.0})  # fmt: skip
    assert bench.rows[0]["case"] == "broken" and bench.rows[0]["error"].startswith("ZeroDivisionError")
    assert gpu.Bench._cells(bench.rows[0])[1] == "error"
    assert gpu.Bench._cells(bench.rows[1]) == ["fine", "ok", "10.0", "20.0", "2.00x", "100 GB/s", "50%"]
    no_baseline = {**bench.rows[1], "torch_us": math.nan, "speedup": math.nan, "tflops": 3.0}
    del no_baseline["gbps"]
    assert gpu.Bench._cells(no_baseline)[3:6] == ["-", "-", "3 TFLOP/s"]


def test_tolerance_rule():
    ref = torch.tensor([1.0, -2.0])
    assert gpu._ok(1e-3, 1e-3, ref) == "ok"  # as good as torch
    assert gpu._ok(2e-3, 1e-3, ref) == "ok"  # 2x torch's error is the limit
    assert gpu._ok(3e-3, 1e-3, ref) == "FAIL"
    assert gpu._ok(1e-7, 0.0, ref) == "ok"  # torch exact: a few fp32 ulps allowed


@pytest.mark.gpu
def test_quick_run_on_a_gpu(tmp_path):
    path = tmp_path / "gpu.json"
    rc = gpu.run(quick=True, json_path=str(path))
    data = json.loads(path.read_text())
    errors = [r for r in data["rows"] if "error" in r or r.get("ok") == "FAIL"]
    assert rc == 0 and not errors, errors
    assert {r["section"] for r in data["rows"]} == set(gpu.SECTIONS)
    assert data["copy_gbps"] > 100 and data["bf16_tflops"] > 10


@pytest.mark.parametrize("argv, msg", [
    (["bench", "gpu", "--sections", "norms,foo"], "--sections: expected a comma-separated list of"),
    (["bench", "gpu", "--sections", ","], "--sections: expected a comma-separated list of"),
    (["bench", "rms_norm", "--sections", "tune"], "--sections applies to bench gpu"),
])  # fmt: skip
def test_sections_flag_is_checked(argv, msg, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert msg in capsys.readouterr().err


def test_tune_sweeps_the_decode_tiles_and_restores_them(monkeypatch):
    """Each candidate is in the table while its cases run, a failing case is a row, and
    the shipped tile and split target are back afterwards."""
    from ringfuse.kernels import attention as ta

    shipped = (ta._DECODE_ALIGNED_TILES[(True, 128)], ta.DECODE_TARGET_PROGRAMS)
    seen = []

    def fake_decode(self, b, hq, hkv, ctx, d, paged):
        seen.append((ta._DECODE_ALIGNED_TILES[(True, 128)], ta.DECODE_TARGET_PROGRAMS))
        if ta._DECODE_ALIGNED_TILES[(True, 128)] == (64, 8):
            raise RuntimeError("out of resources")
        return {"ok": "ok", "us": 1.0, "torch_us": 1.0, "speedup": 1.0, "gbps": 1.0, "pct": 1.0}

    from ringfuse.kernels import layer_norm as tln
    from ringfuse.kernels import rms_norm as trn

    warps = []

    def fake_norm(self, op, shape, dt):
        warps.append((op, shape, trn._plan(dt, dt, dt, False, False, shape[1])[2],
                      tln._plan(dt, dt, dt, dt, False, shape[1])[2], ops.cuda_backend()))  # fmt: skip
        return {"ok": "ok", "us": 1.0, "torch_us": 1.0, "speedup": 1.0, "gbps": 1.0, "pct": 1.0}

    monkeypatch.setattr(gpu.Bench, "_decode", fake_decode)
    monkeypatch.setattr(gpu.Bench, "_norm", fake_norm)
    shipped_norm = (trn._plan(torch.bfloat16, torch.bfloat16, torch.bfloat16, False, False, 4096),
                    tln._plan(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16, False, 4096), ops.cuda_backend())
    bench = object.__new__(gpu.Bench)
    bench.rows = []
    bench.tune()
    per = 2 * len(gpu.Bench.TUNE_CASES)
    norm_rows = 3 * sum(len(c) for c in gpu.Bench.TUNE_NORM_WARPS.values())
    assert len(bench.rows) == per * (len(gpu.Bench.TUNE_TILES) - 1 + len(gpu.Bench.TUNE_TARGETS)) + norm_rows
    # each norm case ran on the Triton backend with the swept warp count in both launchers
    assert [(w[2], w[3], w[4]) for w in warps] == [(nw, nw, "triton") for c in gpu.Bench.TUNE_NORM_WARPS.values()
                                                   for nw in c for _ in range(3)]  # fmt: skip
    assert (trn._plan(torch.bfloat16, torch.bfloat16, torch.bfloat16, False, False, 4096),
            tln._plan(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16, False, 4096), ops.cuda_backend()) == shipped_norm
    assert {t for t, _ in seen} == set(gpu.Bench.TUNE_TILES)
    assert {g for t, g in seen if t == shipped[0]} == set(gpu.Bench.TUNE_TARGETS)
    assert sum("error" in r for r in bench.rows) == per
    assert (ta._DECODE_ALIGNED_TILES[(True, 128)], ta.DECODE_TARGET_PROGRAMS) == shipped
