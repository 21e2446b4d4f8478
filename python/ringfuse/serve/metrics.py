"""Prometheus metrics in vLLM's style under a ``ringfuse:`` prefix, each labelled with the
served model's name, in a registry of the server's own (not prometheus_client's global one),
so several servers can live in one process.

Counted on the event loop as the engine loop reports (engine_loop.Observer); the gauges and
the prefix-cache counters are read at scrape time from the engine loop's counts and its
thread's last snapshot.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine_loop import EngineLoop

# vLLM's buckets, with finer ones below 10 ms: a small model on a CPU decodes in milliseconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISHED_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    """engine_loop.Observer that feeds the ``ringfuse:*`` metrics."""

    def __init__(self, model_name: str, engine: EngineLoop):
        self.registry = reg = CollectorRegistry()
        name = ("model_name",)

        def counter(metric, doc):
            return Counter(metric, doc, name, registry=reg).labels(model_name)

        def histogram(metric, doc, buckets):
            return Histogram(metric, doc, name, buckets=buckets, registry=reg).labels(model_name)

        self._prompt_tokens = counter("ringfuse:prompt_tokens", "Prompt tokens of the requests admitted.")
        self._generation_tokens = counter("ringfuse:generation_tokens", "Tokens generated.")
        success = Counter("ringfuse:request_success", "Requests finished, by finish reason (stop: eos or a stop "
                          "string; length; abort: the client went away; error).", ("model_name", "finished_reason"),
                          registry=reg)  # fmt: skip
        self._finished = {r: success.labels(model_name, r) for r in FINISHED_REASONS}
        self._ttft = histogram("ringfuse:time_to_first_token_seconds",
                               "Time from a request's arrival to its first token.", TTFT_BUCKETS)
        self._itl = histogram("ringfuse:inter_token_latency_seconds", "Time between a request's tokens.", ITL_BUCKETS)
        self._e2e = histogram("ringfuse:e2e_request_latency_seconds",
                              "Time from a request's arrival to its last token.", REQUEST_BUCKETS)
        self._queue = histogram("ringfuse:request_queue_time_seconds",
                                "Time a request waited before the engine admitted it.", REQUEST_BUCKETS)
        reg.register(_EngineCollector(model_name, engine))

    def first_token(self, prompt_tokens: int, ttft_s: float) -> None:
        self._prompt_tokens.inc(prompt_tokens)
        self._ttft.observe(ttft_s)

    def token(self, inter_token_s: float | None) -> None:
        self._generation_tokens.inc()
        if inter_token_s is not None:
            self._itl.observe(inter_token_s)

    def finished(self, reason: str, e2e_s: float | None, queue_s: float | None) -> None:
        self._finished[reason].inc()
        if e2e_s is not None:
            self._e2e.observe(e2e_s)
        if queue_s is not None:
            self._queue.observe(queue_s)


class _EngineCollector:
    """The engine's state at scrape time."""

    def __init__(self, model_name: str, engine: EngineLoop):
        self._labels, self._engine = [model_name], engine

    def describe(self):
        return []  # no fixed description: the registry calls collect() on scrape only

    def collect(self):
        e, stats = self._engine, self._engine.stats
        for metric, doc, value in (
            ("ringfuse:num_requests_running", "Sequences in the running batch.", e.num_running),
            ("ringfuse:num_requests_waiting", "Sequences waiting for admission.", e.num_waiting),
            ("ringfuse:kv_cache_usage_perc", "Fraction of the KV cache held by requests (1 = full).",
             stats.kv_cache_usage),
        ):  # fmt: skip
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric(self._labels, value)
            yield g
        for metric, doc, value in (
            ("ringfuse:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queries),
            ("ringfuse:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
        ):  # fmt: skip
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric(self._labels, value)
            yield c
