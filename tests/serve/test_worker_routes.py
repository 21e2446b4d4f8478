"""The routes a balancer in front of several servers reads, in sglang-router's names:
/model_info and /server_info (and their /get_* aliases) and /get_load."""

import contextlib
import threading

import pytest

from ringfuse.serve.app import _local_tokenizer_dir

from .conftest import MAX_BATCH, MAX_MODEL_LEN, MODEL_NAME, TIMEOUT_S, serving, wait_for
from .test_engine_loop import LONG, _data


@pytest.mark.parametrize("path", ["/model_info", "/get_model_info"])
def test_model_info(server, path):
    with server.http() as http:
        r = http.get(path)
    assert r.status_code == 200, r.text
    # a GGUF carries its tokenizer inside: no path is given, so the router downloads nothing
    assert r.json() == {"served_model_name": MODEL_NAME, "is_generation": True}


@pytest.mark.parametrize("path", ["/server_info", "/get_server_info"])
def test_server_info(server, llm, path):
    with server.http() as http:
        info = http.get(path).json()
    assert info["served_model_name"] == MODEL_NAME and info["is_generation"] is True and info["status"] == "ready"
    assert info["max_model_len"] == MAX_MODEL_LEN and info["max_running_requests"] == MAX_BATCH
    assert info["max_total_num_tokens"] == llm.kv.num_blocks * llm.block_size
    assert info["tp_size"] == info["dp_size"] == 1 and info["max_waiting"] == 64 and info["version"]
    assert "model_path" not in info and "tokenizer_path" not in info


def test_info_while_loading_and_with_an_api_key(llm, offline):
    """The balancer's routes answer before the model is loaded, and stay open with --api-key
    (as the probes: the router reads them without the clients' key)."""
    gate = threading.Event()

    def slow_load():
        assert gate.wait(TIMEOUT_S)
        return llm

    try:
        with serving(llm, make_llm=slow_load, wait_ready=False, api_key="sesame") as served, served.http() as http:
            assert http.get("/model_info").json() == {"served_model_name": MODEL_NAME, "is_generation": True}
            info = http.get("/server_info").json()
            assert info["status"] == "loading" and "max_model_len" not in info
            assert http.get("/get_load").status_code == 200
            gate.set()
            assert served.ready.wait(TIMEOUT_S)
            assert http.get("/server_info").json()["status"] == "ready"
            assert http.get("/v1/models").status_code == 401  # the API itself still needs the key
    finally:
        gate.set()


def test_a_local_tokenizer_folder_is_named(tmp_path):
    """An HF folder with tokenizer.json is named (the router loads it from disk); a GGUF file
    or a folder without one is not (the router would try to download a tokenizer)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{}")
    assert _local_tokenizer_dir(hf) == str(hf.resolve())
    bare = tmp_path / "bare"
    bare.mkdir()
    assert _local_tokenizer_dir(bare) is None
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert _local_tokenizer_dir(gguf) is None
    assert _local_tokenizer_dir(tmp_path / "missing") is None


def _load(http) -> dict:
    (load,) = http.get("/get_load").json()  # one data-parallel rank
    return load


def test_get_load_counts_running_waiting_and_kv_tokens(server, llm):
    """sglang's format: [{"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}]. With the
    batch full (MAX_BATCH endless streams) one more request waits; the running ones hold
    their prompt and generated tokens in the KV cache; all zero once the clients leave."""
    prompt_len = len(llm.tokenizer.encode(LONG["prompt"]))
    with server.http() as probe:
        assert probe.get("/get_load").json() == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
        with contextlib.ExitStack() as streams:
            lines = []  # kept: a line iterator collected early would close its stream
            for i in range(MAX_BATCH + 1):
                client = streams.enter_context(server.http())
                lines.append(streams.enter_context(client.stream("POST", "/v1/completions", json=LONG)).iter_lines())
                if i < MAX_BATCH:
                    assert _data(lines[-1])["choices"]  # decoding

            def one_waits():
                load = _load(probe)
                return load if load["num_waiting_reqs"] == 1 else None

            load = wait_for(one_waits, "the third request to wait")
            assert load["num_reqs"] == MAX_BATCH
            assert MAX_BATCH * (prompt_len + 1) <= load["num_tokens"] <= MAX_BATCH * MAX_MODEL_LEN
        wait_for(lambda: _load(probe) == {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0},
                 "every request gone")  # fmt: skip
