"""`ringfuse generate` and `ringfuse chat` as a user runs them (subprocesses, default model)."""

import os
import subprocess
import sys

import pytest


def _run(args, stdin="", env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ringfuse", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def model_arg(default_gguf_path):
    return ["--model", str(default_gguf_path), "--threads", "1"]


def test_generate_streams_text_and_prints_figures(model_arg, llm_fp32):
    done = _run(["generate", *model_arg, "--max-new-tokens", "12", "What is the capital of France?"])
    assert done.returncode == 0, done.stderr
    want = llm_fp32.generate("What is the capital of France?", max_new_tokens=12)[0].text
    assert done.stdout.strip() == want.strip() and "Paris" in done.stdout
    assert "decode" in done.stderr and "tok/s" in done.stderr


def test_generate_several_prompts(model_arg):
    done = _run(["generate", *model_arg, "--max-new-tokens", "4", "--ignore-eos", "Hi", "Hello there"])
    assert done.returncode == 0, done.stderr
    assert "--- [0] Hi" in done.stdout and "--- [1] Hello there" in done.stdout
    assert "8 new tokens" in done.stderr


def test_chat_reads_lines_until_eof(model_arg):
    done = _run(["chat", *model_arg, "--max-new-tokens", "12"], stdin="What is the capital of France?\n")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


@pytest.mark.parametrize("args,match", [
    (["generate", "--quant", "int4", "x"], "invalid choice"),
    (["generate", "--max-new-tokens", "0", "x"], "--max-new-tokens must be >= 1"),
    (["generate", "--tp", "2", "x"], "torchrun --nproc-per-node 2"),
    (["generate", "--model", "/nonexistent.gguf", "x"], "not found"),
    (["bench", "rms_norm", "--json", "/tmp/x.json"], "--json applies to bench serve, gpu and generate"),  # was ignored
    # flags of other benches were ignored, bad values included
    (["bench", "limits", "--threads", "100000"], "--threads must be in [1, "),
    (["generate", "--threads", "100000", "x"], "threads must be an int in [1, "),
    (["bench", "limits", "--nproc", "2"], "--nproc applies to bench allreduce and tp"),  # the default, given
    (["bench", "limits", "--nproc", "-1"], "--nproc applies to bench allreduce and tp, not to bench limits"),
    (["bench", "limits", "--shape", "tiny"], "--shape applies to bench generate, not to bench limits"),
    (["bench", "generate", "--batch", "3"], "--batch applies to bench generate with --device / --shape"),
    (["bench", "generate", "--shape", "tiny", "--passes", "3"], "--passes applies to bench generate without"),
    (["bench", "rms_norm", "--requests", "4"], "--requests applies to bench serve, not to bench rms_norm"),
    (["bench", "generate", "--shape", "tiny", "--batch", "-1"], "--batch must be >= 1, got -1"),
    (["bench", "generate", "--shape", "tiny", "--prompt-tokens", "0"], "--prompt-tokens must be >= 1, got 0"),
    # checked before the bench runs, not after it (the results were lost)
    (["bench", "generate", "--shape", "tiny", "--json", "/proc/version/x.json"], "--json /proc/version/x.json: cannot"),
])  # fmt: skip
def test_bad_flags_are_clear_errors(args, match):
    done = _run(args)
    assert done.returncode == 2 and match in done.stderr, done.stderr


def test_chat_refuses_what_can_never_work_before_it_reads(model_arg):
    """Bad sampling flags were reported only after the first message (never with an immediate
    Ctrl-D); a --system prompt longer than the context made every message 'skipped'."""
    for flags in (["--temperature", "-1"], ["--stop", ""]):
        done = _run(["chat", *model_arg, *flags], stdin="Hi\n")
        assert done.returncode == 2 and "error:" in done.stderr and "Ctrl-D" not in done.stderr, done.stderr
    done = _run(["chat", *model_arg, "--max-model-len", "40", "--system", "sys " * 100], stdin="Hi\n")
    assert done.returncode == 2 and "the --system prompt needs" in done.stderr, done.stderr


def test_one_new_token_has_no_decode_rate(model_arg, llm_fp32):
    """It printed 'decode nan tok/s' (the first token comes from the prefill)."""
    first = llm_fp32.generate("Hi", max_new_tokens=1)[0].text
    done = _run(["generate", *model_arg, "--max-new-tokens", "1", "Hi"])
    assert done.returncode == 0 and "1 new token: no decode step" in done.stderr and first, done.stderr
    assert "nan" not in done.stderr


def test_chat_drops_the_oldest_turns_when_the_context_is_full(model_arg):
    """A conversation longer than the context loses its oldest turns (one stderr line says
    so) and goes on; a message that cannot fit even alone is skipped, and the chat goes on."""
    lines = ["Name a color.", "Name an animal.", "Name a fruit.", "Name a tree.", "word " * 200,
             "What is the capital of France?"]  # fmt: skip
    done = _run(["chat", *model_arg, "--max-new-tokens", "12", "--max-model-len", "128"],
                stdin="\n".join(lines) + "\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = done.stderr.splitlines()
    assert any("dropped the" in n and "oldest turn" in n for n in notes), done.stderr
    assert sum("but the context is 128" in n and "skipped it" in n for n in notes) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Paris" in done.stdout.split("> ")[-2]


def _read_until(proc, marker: bytes, timeout=240.0) -> bytes:
    """Bytes from proc's stdout until ``marker`` shows up (fails on EOF or timeout)."""
    import select
    import time

    got, end = b"", time.monotonic() + timeout
    while marker not in got:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        assert ready, f"timed out waiting for {marker!r}; got {got!r}"
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"stdout closed before {marker!r}: {got!r} / {proc.stderr.read()!r}"
        got += chunk
    return got


def _sigint_default():
    """In the child before exec: SIGINT as a terminal delivers it. A parent started as a
    background job of a non-interactive shell (`cmd &`) ignores SIGINT, its children inherit
    that, and Python leaves an ignored SIGINT ignored: Ctrl-C would then not reach the CLI."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "ringfuse", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_sigint_default)  # fmt: skip


def _assert_interrupted(proc, err: bytes, command: str) -> None:
    """Ctrl-C ends a command as CLIs do: exit code 130, one last stderr line, no traceback."""
    err = err.decode()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"ringfuse {command}: interrupted" and "Traceback" not in err, err


def test_ctrl_c_during_generate_says_interrupted_and_exits_130(model_arg):
    import signal

    proc = _popen(["generate", *model_arg, "--max-new-tokens", "4000", "--ignore-eos", "Count to one thousand."])
    try:
        got = _read_until(proc, b" ")  # streaming has started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    _assert_interrupted(proc, err, "generate")
    assert (got + out).endswith(b"\n")  # the partial line is ended


def test_output_piped_into_a_reader_that_leaves_ends_quietly(model_arg):
    """`ringfuse generate ... | head -1` printed "error: [Errno 32] Broken pipe", exit 2."""
    proc = _popen(["generate", *model_arg, "--max-new-tokens", "400", "--ignore-eos", "Count to one thousand."])
    try:
        _read_until(proc, b" ")
        proc.stdout.close()  # the reader is gone
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 141 and "error" not in err.decode() and "Traceback" not in err.decode(), err


def test_ctrl_c_while_the_package_loads_says_interrupted(model_arg):
    """A Ctrl-C in the first second (torch loading) printed a traceback through importlib."""
    import signal
    import time

    proc = _popen(["generate", *model_arg, "--max-new-tokens", "4", "Hi"])
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:  # torch's library mapped: ringfuse's __init__ is running
            with open(f"/proc/{proc.pid}/maps") as f:
                if "libtorch" in f.read():
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130 and "interrupted" in err.strip().splitlines()[-1] and "Traceback" not in err, err


@pytest.mark.parametrize("command", [["info"], ["generate", "x"]])
def test_a_bad_ringfuse_isa_is_one_line(command):
    done = _run(command, env_extra={"RINGFUSE_ISA": "avx3"})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "ringfuse: error: RINGFUSE_ISA: ringfuse._C: isa must be 'auto', 'amx', 'avx512vnni', 'avx2' or 'scalar', "
        "got 'avx3'"], done.stderr  # fmt: skip


def test_ctrl_c_in_chat_stops_the_answer_then_quits_with_130(model_arg):
    import signal

    proc = _popen(["chat", *model_arg, "--max-new-tokens", "400"])
    try:
        _read_until(proc, b"> ")
        proc.stdin.write(b"Write a long essay about the history of Rome.\n")
        proc.stdin.flush()
        _read_until(proc, b" ")  # the answer is streaming: Ctrl-C stops it, the chat goes on
        proc.send_signal(signal.SIGINT)
        assert b"[interrupted]" in _read_until(proc, b"> ")
        proc.send_signal(signal.SIGINT)  # at the prompt: quit
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    _assert_interrupted(proc, err, "chat")


def test_invalid_utf8_in_argv_and_stdin_is_replaced_with_a_warning(model_arg):
    bad = b"Say hi \xff\xfe please".decode("utf-8", "surrogateescape")  # as Python hands such argv over
    done = _run(["generate", *model_arg, "--max-new-tokens", "3", bad])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "prompt 0 is not valid UTF-8" in done.stderr and done.stdout.strip()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # strict stdin, as a UTF-8 locale has
    done = subprocess.run([sys.executable, "-m", "ringfuse", "chat", *model_arg, "--max-new-tokens", "3"],
                          input=b"Say hi \xff\xfe please\n", capture_output=True, timeout=300, env=env)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err and "the input is not valid UTF-8" in err, err


def test_unwritable_cache_folder_gives_one_warning(model_arg, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    done = _run(["generate", *model_arg, "--max-new-tokens", "3", "hi"],
                env_extra={"RINGFUSE_CACHE": str(blocked), "RINGFUSE_WEIGHT_CACHE": "1"})  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    warns = [n for n in done.stderr.splitlines() if "warning" in n]
    assert len(warns) == 1 and f"RINGFUSE_CACHE={blocked}" in warns[0] and "is a file" in warns[0], done.stderr


@pytest.mark.parametrize("argv,want", [
    (["/usr/bin/python3", "/venv/bin/ringfuse", "generate"], True),
    (["python", "-m", "ringfuse", "info"], True),
    (["python", "-X", "dev", "-m", "ringfuse"], True),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "-c", "import ringfuse"], False),  # spawned children run this way
    (["python", "script.py", "ringfuse"], False),
])  # fmt: skip
def test_the_package_knows_when_it_is_the_command(argv, want):
    import ringfuse

    assert ringfuse._invoked_as_command(argv) is want
