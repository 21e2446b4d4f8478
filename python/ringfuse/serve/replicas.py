"""``ringfuse serve --replicas N``: N servers behind sglang-router, started and stopped as one.

The balancer is sglang-router (PyPI ``sglang-router``, a prebuilt Rust binary): made for
LLM replicas, with power-of-two / cache-aware / round-robin routing, health checks and
retries with backoff. (vllm-router, its fork, failed 2 of 20 requests with plain-text 500s
when a replica was killed; sglang-router failed none.) ringfuse serves the worker routes
it reads (app.py: /model_info, /server_info, /get_load), and ignores the fields it adds to
every body (protocol.py).

- Workers: ``python -m ringfuse serve`` on 127.0.0.1, each with ``--port 0`` (it binds a
  free port and prints it, so no two processes race for one) and ``--threads`` cores // N
  unless given.
- The router: on ``--host``/``--port``, with each worker's ``/ready`` as its health check,
  every second (one failure takes a worker out of rotation, one success puts it back), and
  up to 8 retries with backoff from 50 ms (~2.5 s in all: longer than the health check takes
  to see a dead worker) on connection errors, 408/429/5xx. Its Prometheus metrics
  (``smg_*``) go to 127.0.0.1:``--router-metrics-port`` (default: a free port).

Children: each runs in its own session (its own process group), so a Ctrl-C at the terminal
reaches this supervisor only, which stops them all; each is stopped as a group (SIGTERM,
then SIGKILL after STOP_TIMEOUT_S). Each also has the kernel's parent-death signal set
(PR_SET_PDEATHSIG, Linux): if the supervisor is killed outright, the children get SIGTERM.
That signal follows the *thread* that started a child, so start and poll a ReplicaSet from
one long-lived thread (the main one).

A worker that dies is restarted on its port (the router takes it back once its /ready says
200; meanwhile the others serve); one that dies MAX_RESTARTS + 1 times within
RESTART_WINDOW_S, or the router dying, stops everything with an error.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, TextIO

POLICIES = ("power_of_two", "cache_aware", "round_robin")
ROUTER_MODULE = "sglang_router"
ROUTER_HINT = "pip install 'ringfuse[serve]' (or: pip install sglang-router)"
STARTUP_TIMEOUT_S = 600.0  # model loads included
STOP_TIMEOUT_S = 10.0  # SIGTERM to SIGKILL: a worker's graceful shutdown takes up to 5 s
KILL_WAIT_S = 5.0  # after SIGKILL: the kernel reaps at once, this only bounds a stuck zombie
MONITOR_INTERVAL_S = 0.2
MAX_RESTARTS, RESTART_WINDOW_S = 3, 300.0
PROBE_TIMEOUT_S = 2.0  # one HTTP probe of a child

# python -c this PARENT_PID PROGRAM ARGS...: have the kernel SIGTERM this process when its
# parent dies (PR_SET_PDEATHSIG = 1), then exec PROGRAM, which keeps the pid and the setting
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"
    "if os.getppid() != int(sys.argv[1]):\n"  # the parent died before prctl: nobody will stop us
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
_LISTENING = re.compile(r"listening on (http://\S+?);")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the router colours its log even into a pipe


class ReplicaError(RuntimeError):
    """The replicas could not start, or stopped serving (the message says which and why)."""


def router_installed() -> bool:
    try:
        return importlib.util.find_spec(ROUTER_MODULE) is not None
    except (ImportError, ValueError):  # a broken install, or a module blocked in sys.modules
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (for the router, which cannot be told to pick one)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::"):  # listening everywhere: local clients reach it on loopback
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _get(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[int, bytes]:
    """(status, body) of GET url; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):  # refused, reset, timed out
        return 0, b""


class Child:
    """A child process in its own session, its output (stdout and stderr) read line by line on
    a thread, echoed to ``log`` with a ``[name]`` prefix and its tail kept for error messages."""

    def __init__(self, name: str, argv: list[str], env: dict | None, log: TextIO | None):
        self.name, self.argv, self.log = name, argv, log
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.url: str | None = None  # a worker's, from its "listening on" line
        self.listening = threading.Event()
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _PDEATHSIG_EXEC, str(os.getpid()), *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True,
                                     errors="replace", bufsize=1)  # fmt: skip
        self.pid = self.proc.pid  # also its process group's id (start_new_session)
        self._reader = threading.Thread(target=self._read, name=f"ringfuse-{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = _ANSI.sub("", line.rstrip("\n"))
            self.tail.append(line)
            if self.url is None and (m := _LISTENING.search(line)):
                self.url = m.group(1)
                self.listening.set()
            if self.log is not None:
                try:
                    print(f"[{self.name}] {line}", file=self.log, flush=True)
                except (OSError, ValueError):  # the log was closed (the supervisor is exiting)
                    pass

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_status(self) -> str:
        """'<name> (pid N) exited with 1' or '... was killed by SIGKILL'."""
        code = self.proc.returncode
        how = f"exited with {code}"
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:  # a real-time signal: no name
                how = f"was killed by signal {-code}"
        return f"{self.name} (pid {self.pid}) {how}"

    def describe_exit(self) -> str:
        """exit_status() and the last lines it printed."""
        self._reader.join(PROBE_TIMEOUT_S)  # it exited: its last lines may still be in the pipe
        tail = "\n".join(f"  {line}" for line in self.tail)
        return self.exit_status() + (f"; its last output:\n{tail}" if tail else "")

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):  # the group is gone (PermissionError: macOS after exit)
            pass

    def close(self, reader_timeout: float = 1.0) -> None:
        self._reader.join(reader_timeout)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def stop_children(children: list[Child], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every child's process group, wait up to ``timeout`` s in all, SIGKILL the
    groups of those still running, and reap them all."""
    for c in children:
        if c.alive:
            c.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in children:
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for c in children:
        c.signal_group(signal.SIGKILL)  # the stragglers, and anything a child left in its group
        try:
            c.proc.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:  # unkillable (D state): report it rather than hang
            print(f"ringfuse serve: warning: {c.name} (pid {c.pid}) did not exit after SIGKILL", file=sys.stderr)
        c.close()


class ReplicaSet:
    """N ``ringfuse serve`` workers on 127.0.0.1 and sglang-router in front of them.

    ``worker_args``: the ``ringfuse serve`` flags of every worker (model, batch, ...; not
    --host, --port, --threads). ``threads``: each worker's --threads (None: cores // N, at
    least 1). ``host``/``port``: the router's (port 0: a free one). ``policy``: one of
    POLICIES (None: power_of_two, or round_robin for one replica). ``metrics_port``: the
    router's Prometheus port (None: a free one). ``log``: where the children's output is
    echoed, prefixed with their names (None: kept only for error messages).

    ``start()`` returns once the router answers and every worker is ready; ``poll()``
    restarts dead workers; ``stop()`` ends every child. A context manager: start on entry,
    stop on exit."""

    def __init__(self, worker_args: list[str], replicas: int, *, threads: int | None = None, host: str = "127.0.0.1",
                 port: int = 8000, policy: str | None = None, metrics_port: int | None = None,
                 env: dict | None = None, log: TextIO | None = sys.stderr, router_log_level: str = "warn",
                 stopping: threading.Event | None = None):  # fmt: skip
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
        if policy is None:
            policy = "power_of_two" if replicas > 1 else "round_robin"
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy == "power_of_two" and replicas < 2:  # the router refuses it at start
            raise ValueError("policy 'power_of_two' needs replicas >= 2 (it picks the less loaded of two)")
        if threads is None:
            threads = max(1, len(os.sched_getaffinity(0)) // replicas)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        self.worker_args, self.replicas, self.threads = list(worker_args), replicas, threads
        self.host, self.port, self.policy, self.metrics_port = host, port, policy, metrics_port
        self.env, self.log, self.router_log_level = env, log, router_log_level
        self.stopping = stopping or threading.Event()  # set (by a signal handler): start() gives up
        self.workers: list[Child] = []
        self.router: Child | None = None
        self._ports: list[int] = []  # each worker's port, kept across restarts
        self._restarts: list[collections.deque[float]] = []
        self._retired: list[Child] = []  # dead workers already replaced (reaped, output closed)

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    @property
    def metrics_url(self) -> str:
        return http_url("127.0.0.1", self.metrics_port)

    @property
    def children(self) -> list[Child]:
        return [*self.workers, *([self.router] if self.router else [])]

    # ---- start ---------------------------------------------------------------------------

    def _worker_argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", "ringfuse", "serve", *self.worker_args, "--host", "127.0.0.1", "--port",
                str(port), "--threads", str(self.threads)]  # fmt: skip

    def _router_argv(self) -> list[str]:
        return [sys.executable, "-m", f"{ROUTER_MODULE}.launch_router", "--host", self.host, "--port", str(self.port),
                "--worker-urls", *(w.url for w in self.workers), "--policy", self.policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
                # a worker is in rotation while its /ready says 200, checked every second
                "--health-check-endpoint", "/ready", "--health-check-interval-secs", "1",
                "--health-failure-threshold", "1", "--health-success-threshold", "1",
                "--worker-startup-timeout-secs", str(int(STARTUP_TIMEOUT_S)), "--worker-startup-check-interval", "1",
                # a request that found a dead or busy (429) worker is retried, on another one once the
                # health check has seen a dead one (<= 1 s): 8 tries with backoff 50 ms x 1.5^k span ~2.5 s
                "--retry-max-retries", "8", "--retry-initial-backoff-ms", "50", "--retry-backoff-multiplier", "1.5",
                "--shutdown-grace-period-secs", "5", "--log-level", self.router_log_level]  # fmt: skip

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start the workers and the router; return once the router answers and every
        worker is ready. ReplicaError (after stopping every child) if a child exits first,
        ``timeout`` s pass or ``stopping`` is set."""
        if not router_installed():
            raise ReplicaError(f"--replicas needs sglang-router, which is not installed. Install it with: "
                               f"{ROUTER_HINT}")  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            for i in range(self.replicas):
                self.workers.append(Child(f"replica {i}", self._worker_argv(0), self.env, self.log))
                self._restarts.append(collections.deque())
            for w in self.workers:
                self._wait(w.listening.is_set, f"{w.name} to listen", deadline)
            self._ports = [int(w.url.rsplit(":", 1)[1]) for w in self.workers]
            if self.port == 0:
                self.port = free_port(self.host)
            if self.metrics_port is None:
                self.metrics_port = free_port()
            self.router = Child("router", self._router_argv(), self.env, self.log)
            for w in self.workers:
                self._wait(lambda url=w.url: _get(f"{url}/ready")[0] == 200, f"{w.name} to load its model", deadline)
            self._wait(self._router_serves_all, "the router to route to every worker", deadline)
        except BaseException:
            self.stop()
            raise

    def _wait(self, condition: Callable[[], bool], what: str, deadline: float) -> None:
        """Poll ``condition`` until true; ReplicaError if a child exits, the deadline passes
        or ``stopping`` is set first."""
        while not condition():
            for c in self.children:
                if not c.alive:
                    raise ReplicaError(f"{c.describe_exit()}\n(while waiting for {what})")
            if self.stopping.is_set():
                raise ReplicaError(f"stopped while waiting for {what}")
            if time.monotonic() > deadline:
                raise ReplicaError(f"timed out waiting for {what}")
            self.stopping.wait(MONITOR_INTERVAL_S)

    def _router_serves_all(self) -> bool:
        """The router lists every worker as healthy (GET /workers), so none is skipped."""
        status, body = _get(f"{self.url}/workers")
        if status != 200:
            return False
        try:
            listed = json.loads(body)["workers"]
            healthy = {w["url"].rstrip("/") for w in listed if w.get("is_healthy")}
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        return healthy >= {w.url for w in self.workers}

    # ---- run -----------------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Check the children once: restart the workers that died (on their ports); what
        happened, as messages. ReplicaError if the router died or a worker died
        MAX_RESTARTS + 1 times within RESTART_WINDOW_S (the caller stops everything)."""
        if self.router is not None and not self.router.alive:
            raise ReplicaError(self.router.describe_exit())
        events = []
        now = time.monotonic()
        for i, w in enumerate(self.workers):
            if w.alive:
                continue
            restarts = self._restarts[i]
            while restarts and now - restarts[0] > RESTART_WINDOW_S:
                restarts.popleft()
            if len(restarts) >= MAX_RESTARTS:
                raise ReplicaError(f"{w.describe_exit()}\nit died {MAX_RESTARTS + 1} times within "
                                   f"{RESTART_WINDOW_S:.0f} s; giving up")  # fmt: skip
            restarts.append(now)
            w.close()
            self._retired.append(w)
            self.workers[i] = Child(w.name, self._worker_argv(self._ports[i]), self.env, self.log)
            events.append(f"{w.exit_status()}; restarted it as pid {self.workers[i].pid} on "
                          f"port {self._ports[i]} (the router sends it requests once it is ready)")  # fmt: skip
        return events

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop every child (SIGTERM, SIGKILL after ``timeout`` s) and reap them. Idempotent."""
        stop_children(self.children, timeout)

    def pids(self) -> list[int]:
        """Every process this set started, dead or alive (the replaced workers too)."""
        return [c.pid for c in (*self._retired, *self.children)]

    def __enter__(self) -> ReplicaSet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the command -----------------------------------------------------------------------------

# `ringfuse serve` flags passed on to every worker: (flag, attribute of the parsed args)
_WORKER_FLAGS = (("--device", "device"), ("--dtype", "dtype"), ("--quant", "quant"),
                 ("--gpu-memory-utilization", "gpu_memory_utilization"), ("--max-model-len", "max_model_len"),
                 ("--max-batch", "max_batch"), ("--kv-cache-tokens", "kv_cache_tokens"),
                 ("--max-waiting", "max_waiting"), ("--max-body-bytes", "max_body_bytes"),
                 ("--log-level", "log_level"))  # fmt: skip
_ROUTER_LOG_LEVELS = {"critical": "error", "error": "error", "warning": "warn", "info": "warn", "debug": "debug"}


def worker_args(args, model: str, served_model_name: str) -> list[str]:
    out = ["--model", model, "--served-model-name", served_model_name]
    for flag, name in _WORKER_FLAGS:
        value = getattr(args, name)
        if value is not None:
            out += [flag, str(value)]
    if args.weight_cache is False:
        out.append("--no-weight-cache")
    return out


def run(args) -> int:
    """``ringfuse serve --replicas N``: serve until SIGTERM / SIGINT (exit status 0 / 130),
    or until the router dies or a worker keeps dying (1). 2: sglang-router is missing or
    the port is taken."""
    from ..runtime.model_files import DEFAULT_MODEL_NAME, default_model_path
    from .server import bind

    def say(message: str) -> None:
        print(f"ringfuse serve: {message}", file=sys.stderr, flush=True)

    if not router_installed():
        say(f"error: --replicas needs sglang-router, which is not installed. Install it with: {ROUTER_HINT}")
        return 2
    if args.port != 0:  # a busy port is said at once, not after N models have loaded
        try:
            bind(args.host, args.port).close()
        except OSError as e:
            say(f"error: cannot listen on {args.host}:{args.port}: {e}")
            return 2
    served = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    # the default model is fetched here, once, rather than by N workers at the same time
    model = args.model if args.model is not None else str(default_model_path())
    env = dict(os.environ)
    if args.api_key is not None:  # through the environment: a command line is visible to every user (ps)
        env["RINGFUSE_API_KEY"] = args.api_key
    stopping = threading.Event()
    replicas = ReplicaSet(worker_args(args, model, served), args.replicas, threads=args.threads, host=args.host,
                          port=args.port, policy=args.policy, metrics_port=args.router_metrics_port, env=env,
                          router_log_level=_ROUTER_LOG_LEVELS[args.log_level], stopping=stopping)  # fmt: skip
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        threads = f"{replicas.threads} thread{'s' * (replicas.threads > 1)} each"
        say(f"starting {args.replicas} replica{'s' * (args.replicas > 1)} of '{served}' ({threads}) behind "
            f"sglang-router ({replicas.policy})")  # fmt: skip
        try:
            replicas.start()
        except (ReplicaError, OSError) as e:  # OSError: a child could not be started
            if not received:
                say(f"error: {e}")
                return 1
        else:
            workers = ", ".join(f"pid {w.pid} on {w.url}" for w in replicas.workers)
            say(f"ready: serving '{served}' on {replicas.url} (sglang-router pid {replicas.router.pid}, its metrics "
                f"on {replicas.metrics_url}/metrics; replicas: {workers})")  # fmt: skip
        while not stopping.wait(MONITOR_INTERVAL_S):
            try:
                for event in replicas.poll():
                    say(event)
            except ReplicaError as e:
                say(f"error: {e}; stopping every replica")
                return 1
        say("stopping")
        return 130 if signal.SIGINT in received else 0
    finally:
        replicas.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
