"""`ringfuse bench serve` without GuideLLM or llama.cpp (CI has neither): GuideLLM's JSON
parsed (fixtures trimmed from real GuideLLM 0.8.1 output: the same key layout, 3 request
records per level), the report (tables, JSON, PNG), the targets, the bench's own client
(prompts at once, the burst) against a stand-in HTTP server, child processes, the commands
it runs, the tokenizer export, the offline worker, and exit status 2 without GuideLLM."""

from __future__ import annotations

import http.server
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RINGFUSE_WEIGHT_CACHE", "0")  # as tests/runtime: no converted-weights files per run

from ringfuse import cli  # noqa: E402
from ringfuse.bench import serve as bs  # noqa: E402

DATA = Path(__file__).parent / "data"
SWEEP = DATA / "guidellm-sweep.json"  # concurrency 1, 4, 16
TWO_LEVELS = DATA / "guidellm-two-levels.json"  # concurrency 1, 4


def settings(**kw) -> bs.Settings:
    base = dict(model=Path("/models/m.gguf"), model_name="m", quant="w8a16", threads=2, requests=32, prompt_tokens=128,
                output_tokens=64)  # fmt: skip
    return bs.Settings(**dict(base, **kw))


# ---- GuideLLM's JSON ------------------------------------------------------------------------


def test_parse_guidellm_reads_the_summaries_and_computes_tpot_per_request():
    raw = json.loads(SWEEP.read_text())
    parsed = bs.parse_guidellm(SWEEP)
    assert parsed["version"] == "0.8.1"
    assert [lv["concurrency"] for lv in parsed["levels"]] == [1, 4, 16]
    for b, lv in zip(raw["benchmarks"], parsed["levels"]):
        m = b["metrics"]
        for p in ("p50", "p90", "p99"):
            assert lv["ttft_ms"][p] == m["time_to_first_token_ms"]["successful"]["percentiles"][p]
            assert lv["itl_ms"][p] == m["inter_token_latency_ms"]["successful"]["percentiles"][p]
            assert lv["e2e_ms"][p] == pytest.approx(1e3 * m["request_latency"]["successful"]["percentiles"][p])
        assert lv["output_tok_s"] == m["output_tokens_per_second"]["successful"]["mean"]
        assert lv["requests"] == {"successful": 32, "errored": 0, "incomplete": 0}
        assert lv["output_tokens_p50"] == 16 and lv["duration_s"] == b["duration"]
        # vLLM's TPOT, each record once: (last token - first token) / (n - 1)
        t = [(r["info"]["timings"], r["output_metrics"]["total_tokens"]) for r in b["requests"]["successful"]]
        tpots = sorted(1e3 * (x["last_token_iteration"] - x["first_token_iteration"]) / (n - 1) for x, n in t)
        assert lv["tpot_ms"]["p50"] == pytest.approx(tpots[1])
        assert tpots[0] <= lv["tpot_ms"]["p90"] <= lv["tpot_ms"]["p99"] <= tpots[-1]


def test_parse_guidellm_without_successful_requests(tmp_path):
    raw = json.loads(TWO_LEVELS.read_text())
    b = raw["benchmarks"][0]
    b["metrics"]["request_totals"] = {"successful": 0, "errored": 4, "incomplete": 0, "total": 4}
    for name in ("time_to_first_token_ms", "inter_token_latency_ms", "request_latency"):
        b["metrics"][name]["successful"]["count"] = 0
    b["requests"]["successful"] = []
    path = tmp_path / "g.json"
    path.write_text(json.dumps(raw))
    lv = bs.parse_guidellm(path)["levels"][0]
    assert lv["ttft_ms"] is None and lv["tpot_ms"] is None and lv["e2e_ms"] is None and lv["output_tok_s"] == 0.0
    assert lv["requests"]["errored"] == 4


def test_parse_guidellm_refuses_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"results": []}')
    with pytest.raises(bs.BenchError, match="not a GuideLLM benchmarks JSON"):
        bs.parse_guidellm(path)


def test_percentiles_interpolate_as_numpy():
    got = bs.percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert got == pytest.approx({"p50": 3.0, "p90": 4.6, "p99": 4.96})
    assert bs.percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    with pytest.raises(ValueError):
        bs.percentiles([])


# ---- report and targets ---------------------------------------------------------------------


def results(peer: bool = True) -> dict:
    rf = bs.parse_guidellm(SWEEP)["levels"]
    engines = {bs.RINGFUSE: {"levels": rf, "concurrent": {"concurrency": 8, "tok_s": 300.0, "rounds_tok_s": [300.0]}}}
    if peer:
        llama = bs.parse_guidellm(SWEEP)["levels"]
        for lv in llama:  # a peer half as fast, with twice the TTFT
            lv["output_tok_s"] /= 2
            lv["ttft_ms"] = {p: 2 * v for p, v in lv["ttft_ms"].items()}
        engines[bs.LLAMA] = {"levels": llama, "concurrent": {"concurrency": 8, "tok_s": 250.0, "rounds_tok_s": [250.0]}}
    return {"config": dict(model_name="SmolLM2-135M-Instruct", quant="w8a16", prompt_tokens=128, output_tokens=64,
                           requests=32, threads=2, guidellm_version="0.8.1"),
            "engines": engines, "errors": [],
            "offline": {"b8_tok_s": 320.0, "prefill_ms": rf[0]["ttft_ms"]["p50"] - 2.0, "prefill_tokens": 128},
            "burst": {"max_waiting": 4, "requests": 16, "ok": 6, "rejected_429": 10, "other": 0,
                      "latency_429_ms": {"p50": 3.0, "p90": 5.0, "p99": 8.0}, "after_status": 200}}  # fmt: skip


def test_report_prints_the_tables_and_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "out" / "serve.json"
    png = bs.report(results(), out)
    text = capsys.readouterr().out
    assert "bench serve:" in text and "targets" in text and "llama.cpp" in text
    assert "2.00x" in text  # ringfuse's throughput over the half-speed peer's
    assert "0.50x" in text  # and its TTFT p50 over the peer's doubled one
    assert str(out) in text and str(png) in text
    assert png == out.with_suffix(".png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # four panels drawn, not an empty canvas
    saved = json.loads(out.read_text())
    assert saved["plot"] == str(png)
    assert [lv["concurrency"] for lv in saved["engines"]["ringfuse"]["levels"]] == [1, 4, 16]
    assert len(saved["targets"]) == 7 and all(t["met"] is True for t in saved["targets"]), saved["targets"]
    assert saved["targets"][0]["measured"] == "300.0 vs 320.0 tok/s = 94% (llama.cpp's server: 250.0)"


def test_targets_say_what_was_not_met_or_not_measured():
    r = results(peer=False)
    r["offline"]["b8_tok_s"] = 400.0  # the server's 300 tok/s is 75%
    r["engines"][bs.RINGFUSE]["levels"][0]["ttft_ms"]["p50"] = r["offline"]["prefill_ms"] + 25
    r["burst"].update(ok=5, rejected_429=10, other=1, latency_429_ms={"p50": 40.0, "p90": 60.0, "p99": 70.0},
                      after_status=None)  # fmt: skip
    got = [(t["target"].split(" ")[0], t["met"], t["measured"]) for t in bs.evaluate_targets(r)]
    assert [m for _, m, _ in got] == [False, False, None, None, False, False, False]
    assert "75%" in got[0][2] and "+25.0 ms" in got[1][2] and "not measured" in got[2][2]
    assert "1 other" in got[4][2] and "70.0 ms" in got[5][2] and got[6][2] == "no reply"
    del r["burst"], r["offline"]
    got = bs.evaluate_targets(r)
    assert [t["met"] for t in got] == [None, None, None, None, None]


def test_report_with_a_missing_level_and_no_peer(tmp_path, capsys):
    r = results(peer=False)
    r["engines"][bs.LLAMA] = {"levels": bs.parse_guidellm(TWO_LEVELS)["levels"]}  # no concurrency 16
    bs.report(r, tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    vs = next(t for t in saved["targets"] if t["target"].startswith("output tok/s"))
    assert vs["met"] is None and "c16" not in vs["measured"] and "c4" in vs["measured"]
    assert (tmp_path / "r.png").is_file()


# ---- the bench's own client against a stand-in server ----------------------------------------


class StandIn(http.server.ThreadingHTTPServer):
    """POST /v1/completions: 200 with usage after ``hold`` s for at most ``limit`` requests
    in flight, 429 with Retry-After at once past that; ``status`` forces another answer."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog: the default 5 resets some of 16 simultaneous connects

    def __init__(self, limit=1000, hold=0.05, status=200):
        self.limit, self.hold, self.status, self.lock, self.bodies = limit, hold, status, threading.Lock(), []
        self.inflight = self.max_inflight = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_port}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(body)
            busy = srv.inflight >= srv.limit
            srv.inflight += not busy
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        if busy:
            return self._send(429, {"error": {"message": "busy"}}, {"Retry-After": "1"})
        try:
            time.sleep(srv.hold)
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            self._send(srv.status, {"choices": [{"text": "x"}], "usage": usage})
        finally:
            with srv.lock:
                srv.inflight -= 1

    def _send(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    servers = []

    def start(**kw):
        srv = StandIn(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]


def test_measure_concurrent_sends_all_prompts_at_once(stand_in):
    srv = stand_in(hold=0.5)
    s = settings(output_tokens=10)
    got = bs.measure_concurrent(srv.url, s, PROMPTS, rounds=2)
    assert got["concurrency"] == 3 and len(got["rounds_tok_s"]) == 2
    assert srv.max_inflight == 3  # the three were in flight together
    assert got["tok_s"] == statistics.median(got["rounds_tok_s"]) > 0
    assert len(srv.bodies) == 9  # one untimed round + two timed
    assert sorted(srv.bodies[:3], key=lambda b: b["prompt"]) == [
        {"model": "m", "prompt": p, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True} for p in PROMPTS]


def test_measure_concurrent_and_warm_up_fail_on_errors(stand_in):
    srv = stand_in(status=500)
    with pytest.raises(bs.BenchError, match="3 prompts at once: 3 failed: HTTP 500"):
        bs.measure_concurrent(srv.url, settings(), PROMPTS, rounds=1)
    with pytest.raises(bs.BenchError, match="warm-up: 16 of 16 requests failed"):
        bs.warm_up(srv.url, settings(), PROMPTS)


def test_warm_up_ends_one_request_per_step(stand_in):
    srv = stand_in(hold=0.0)
    bs.warm_up(srv.url, settings(), PROMPTS)
    assert sorted(b["max_tokens"] for b in srv.bodies) == list(range(2, 18))  # batch sizes 16 down to 1


def test_measure_burst_counts_answers_and_times_the_429s(stand_in):
    srv = stand_in(limit=2, hold=0.5)
    got = bs.measure_burst(srv.url, settings(), PROMPTS, max_waiting=2)
    assert got["requests"] == 8 and got["ok"] + got["rejected_429"] == 8 and got["other"] == 0
    assert got["ok"] >= 2 and got["rejected_429"] >= 1
    assert got["retry_after_on_all_429"] is True
    assert set(got["latency_429_ms"]) == {"p50", "p90", "p99"} and got["latency_200_ms"] is not None
    assert got["after_status"] == 200 and got["after_error"] is None


def test_measure_burst_reports_no_reply(stand_in):
    srv = stand_in()
    url = srv.url
    srv.shutdown()
    srv.server_close()
    got = bs.measure_burst(url, settings(), PROMPTS, max_waiting=1)
    assert got["other"] == 4 and got["after_status"] is None and "Error" in got["after_error"]


# ---- child processes, commands --------------------------------------------------------------

TINY_SERVER = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
print(f"tiny listening on http://127.0.0.1:{srv.server_port}; ok", flush=True)
srv.serve_forever()
"""


def test_child_finds_the_address_waits_for_ready_and_stops(tmp_path):
    child = bs.Child("tiny", [sys.executable, "-c", TINY_SERVER], tmp_path / "tiny.log", tmp_path)
    try:
        url = child.wait_ready("/health", timeout=60)
        assert url.startswith("http://127.0.0.1:") and child.proc.poll() is None
    finally:
        child.stop(timeout=10)
    assert child.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(child.proc.pid, 0)  # the whole session is gone


def test_child_that_dies_is_reported_with_its_log(tmp_path):
    child = bs.Child("dying", [sys.executable, "-c", "print('cannot load the model'); raise SystemExit(3)"],
                     tmp_path / "d.log", tmp_path)  # fmt: skip
    with pytest.raises(bs.BenchError, match=r"(?s)dying exited with status 3.*cannot load the model"):
        child.wait_ready("/ready", timeout=60)
    child.stop()


def test_child_without_an_address_times_out(tmp_path):
    child = bs.Child("silent", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s.log", tmp_path)
    try:
        with pytest.raises(bs.BenchError, match="printed no address within 0.5 s"):
            child.wait_ready("/ready", timeout=0.5)
    finally:
        child.stop(timeout=5)


def test_commands():
    s = settings()
    cmd = bs.ringfuse_command(s)
    assert cmd[:4] == [sys.executable, "-m", "ringfuse", "serve"] and "--max-waiting" not in cmd
    joined = " ".join(cmd)
    assert "--quant w8a16" in joined and "--threads 2" in joined and "--max-batch 16" in joined
    assert "--port 0" in joined and f"--max-model-len {s.max_model_len}" in joined and s.max_model_len == 384
    assert bs.ringfuse_command(s, 4)[-2:] == ["--max-waiting", "4"]
    llama = bs.llama_command(Path("/venv/bin/python"), s)
    assert llama[:2] == ["/venv/bin/python", "-I"] and Path(llama[2]).is_file()
    assert " --parallel 16 " in " ".join(llama) and f"--ctx {16 * 384}" in " ".join(llama)
    g = bs.guidellm_command(Path("/g/guidellm"), "http://127.0.0.1:9", s, Path("/tok"), Path("/o.json"))
    joined = " ".join(g)
    assert "target=http://127.0.0.1:9,model=m,request_format=/v1/completions" in joined
    assert "profile.streams 1,4,16" in joined and "kind=max_requests,count=32" in joined
    assert "prompt_tokens=128,output_tokens=64" in joined and "model=/tok" in joined and "path=/o.json" in joined


def test_guidellm_env(monkeypatch):
    monkeypatch.delenv("GUIDELLM__MAX_WORKER_PROCESSES", raising=False)
    monkeypatch.setenv("NO_PROXY", "example.org")
    env = bs.guidellm_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["GUIDELLM__MAX_WORKER_PROCESSES"] == "1"
    assert env["NO_PROXY"] == "example.org,127.0.0.1,localhost"
    monkeypatch.setenv("GUIDELLM__MAX_WORKER_PROCESSES", "4")
    assert bs.guidellm_env()["GUIDELLM__MAX_WORKER_PROCESSES"] == "4"


def test_peer_python_says_why_llama_cpp_cannot_run(monkeypatch, tmp_path):
    monkeypatch.setenv("PEERS_VENV", str(tmp_path / "none"))
    assert "no peers venv at" in bs.peer_python()
    (tmp_path / "v" / "bin").mkdir(parents=True)
    (tmp_path / "v" / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PEERS_VENV", str(tmp_path / "v"))
    assert "has no xllamacpp" in bs.peer_python()


# ---- GuideLLM missing, flags ----------------------------------------------------------------


def test_without_guidellm_the_bench_says_how_to_get_it_and_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("RINGFUSE_GUIDELLM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["bench", "serve"]) == 2
    err = capsys.readouterr().err
    assert bs.GUIDELLM_INSTALL in err.splitlines()  # the command alone on its line, to copy
    assert bs.GUIDELLM_INSTALL == ("python3 -m venv /tmp/guidellm-venv && /tmp/guidellm-venv/bin/pip install guidellm "
                                   "torch==2.13.0 transformers==5.25.0")  # fmt: skip
    monkeypatch.setenv("RINGFUSE_GUIDELLM", str(tmp_path / "nope"))
    assert cli.main(["bench", "serve"]) == 2
    assert f"$RINGFUSE_GUIDELLM={tmp_path / 'nope'} is not an executable file" in capsys.readouterr().err


def test_guidellm_is_found_on_path_or_through_the_variable(monkeypatch, tmp_path):
    exe = tmp_path / "guidellm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.delenv("RINGFUSE_GUIDELLM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert bs.find_guidellm() == exe
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("RINGFUSE_GUIDELLM", str(exe))
    assert bs.find_guidellm() == exe


@pytest.mark.parametrize("flags,name", [(["--requests", "0"], "--requests"),
                                        (["--output-tokens", "1"], "--output-tokens"),
                                        (["--prompt-tokens", "4000", "--output-tokens", "200"], "<= 4096")])  # fmt: skip
def test_bad_flags_are_flag_errors(flags, name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "serve", *flags])
    assert e.value.code == 2 and name in capsys.readouterr().err


def test_settings_take_the_flags_then_quick_then_the_defaults():
    s = bs.make_settings(Path("m.gguf"), "m")
    assert (s.quant, s.threads, s.requests, s.prompt_tokens, s.output_tokens) == ("w8a16", 2, 32, 128, 64)
    assert (s.max_batch, s.max_model_len) == (16, 384)
    s = bs.make_settings(Path("m.gguf"), "m", quick=True)
    assert (s.requests, s.output_tokens) == (16, 32)
    s = bs.make_settings(Path("m.gguf"), "m", "none", 1, 8, 64, 16, quick=True)
    assert (s.quant, s.threads, s.requests, s.prompt_tokens, s.output_tokens, s.max_model_len) == (
        "none", 1, 8, 64, 16, 256)
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        bs.make_settings(Path("m.gguf"), "m", threads=0)


def test_a_model_that_is_not_a_gguf_exits_2(monkeypatch, tmp_path, capsys):
    exe = tmp_path / "guidellm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("RINGFUSE_GUIDELLM", str(exe))
    (tmp_path / "hf").mkdir()
    assert cli.main(["bench", "serve", "--model", str(tmp_path / "hf")]) == 2
    assert "--model must be a .gguf file" in capsys.readouterr().err


# ---- the tokenizer export and the offline worker (the default model) --------------------------


@pytest.fixture(scope="module")
def gguf() -> Path:
    from ringfuse.runtime.model_files import default_model_path

    return default_model_path()


def test_tokenizer_is_exported_once_and_matches_ringfuse(gguf, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from ringfuse.runtime.tokenizer import Tokenizer
    from ringfuse.runtime.weights import open_weights

    folder = bs.tokenizer_dir(gguf, cache=tmp_path)
    assert folder.parent == tmp_path / "tokenizers" and (folder / "tokenizer.json").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(folder)  # what GuideLLM loads, offline
    ours = Tokenizer.from_gguf(open_weights(gguf).metadata)
    text = "The quick brown fox, 42 times: naïve café!"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(bs.subprocess, "run", no_export)
    assert bs.tokenizer_dir(gguf, cache=tmp_path) == folder  # the same GGUF: reused
    assert not list((tmp_path / "tokenizers").glob(".*.part"))


def test_offline_worker_prints_its_figures(gguf, capsys):
    import torch

    threads = torch.get_num_threads()
    spec = dict(model=str(gguf), quant="none", max_batch=8, max_model_len=256, threads=1, output_tokens=4,
                prompt_tokens=16, rounds=1)  # fmt: skip
    try:
        bs.offline_worker(json.dumps(spec))
    finally:
        torch.set_num_threads(threads)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT "))
    got = json.loads(line[7:])
    assert len(got["prompts"]) == 8 and all(len(p) > 20 for p in got["prompts"])
    assert got["b8_tok_s"] > 0 and got["prefill_ms"] > 0 and got["prefill_tokens"] == 16 and got["threads"] == 1
