"""The service's Prometheus metrics, served at /metrics on --metrics-port (docs/operations.md lists them).

Two kinds, both labelled by `model`:
- What a request reports when its call ends (tokens, finish reasons, failures and its latencies),
  observed by the servicer from the call's record (service/access_log.py): one observation per call.
- What the engine holds or has counted (requests waiting and running, KV cells in use, prefix-cache,
  speculative and idle-prefill tokens, rows per decode step), read from each scheduler when
  Prometheus scrapes, so that the scheduler thread keeps plain counters and pays nothing more per step.

The exposition runs on prometheus_client's own HTTP server thread, never on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from chatrpc.tls import ServerTLS
    from service.access_log import CallRecord
    from service.engine.scheduler import EngineLoad, Scheduler
    from service.models import ModelRegistry

log = logging.getLogger(__name__)

# Counters' `_created` series double what a scrape carries and nothing here reads them.
disable_created_metrics()

PREFIX = "chatrpc_"
# The `model` label of a call that names no model this server serves: a client's text must not
# become a label value (each would be a new time series).
UNSERVED_MODEL = ""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# What the collector reads from each scheduler: (name, family, help, reader of (scheduler, its load)).
_ENGINE_METRICS: tuple[tuple[str, type, str, Callable[[Scheduler, EngineLoad], float]], ...] = (
    (
        "requests_running", GaugeMetricFamily, "Requests admitted into the engine and not over.",
        lambda _, load: load.running,
    ),
    ("requests_waiting", GaugeMetricFamily, "Requests queued for a sequence slot.", lambda _, load: load.waiting),
    (
        "kv_cache_usage_ratio", GaugeMetricFamily,
        "KV cells holding running requests' tokens / KV cells of the context (0-1).",
        lambda _, load: load.kv_cells_used / load.kv_cells if load.kv_cells else 0.0,
    ),
    (
        "prefix_cache_queried_tokens", CounterMetricFamily,
        "Prompt tokens looked up in the prefix cache (every admitted request's prompt).",
        lambda scheduler, _: scheduler.prefix_cache.stats.queried_tokens,
    ),
    (
        "prefix_cache_hit_tokens", CounterMetricFamily,
        "Prompt tokens whose KV the prefix cache supplied instead of a prefill.",
        lambda scheduler, _: scheduler.prefix_cache.stats.reused_tokens,
    ),
    (
        "speculative_drafted_tokens", CounterMetricFamily, "Prompt-lookup guesses checked.",
        lambda scheduler, _: scheduler.timings.drafted_tokens,
    ),
    (
        "speculative_accepted_tokens", CounterMetricFamily, "Guesses that held: tokens gained.",
        lambda scheduler, _: scheduler.timings.accepted_tokens,
    ),
    (
        "idle_prefill_tokens", CounterMetricFamily,
        "Finished requests' tokens prefilled while no request ran, for their next turn.",
        lambda scheduler, _: scheduler.idle_prefill.stats.prefilled_tokens,
    ),
)  # fmt: skip


class EngineCollector(Collector):
    """Each served model's scheduler, read at scrape time."""

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        schedulers = [(model_id, served.scheduler) for model_id, served in self._models.all()]
        loads = [scheduler.load() for _, scheduler in schedulers]
        for name, family_type, text, read in _ENGINE_METRICS:
            family = family_type(PREFIX + name, text, labels=["model"])
            for (model_id, scheduler), load in zip(schedulers, loads, strict=True):
                family.add_metric([model_id], read(scheduler, load))
            yield family
        rows = HistogramMetricFamily(
            PREFIX + "decode_step_rows", "Sequences decoded per decode step.", labels=["model"]
        )
        for model_id, scheduler in schedulers:
            steps = dict(scheduler.timings.steps_by_rows)  # a copy: the scheduler thread goes on counting
            buckets = [(str(bound), sum(n for count, n in steps.items() if count <= bound)) for bound in _ROWS_BUCKETS]
            buckets.append(("+Inf", sum(steps.values())))
            rows.add_metric([model_id], buckets, sum(count * n for count, n in steps.items()))
        yield rows


class ServiceMetrics:
    """The service's registry: the process's own metrics, the engine's, and the calls'."""

    def __init__(self, models: ModelRegistry) -> None:
        self._served = {model_id for model_id, _ in models.all()}
        self.registry = registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, EngineCollector(models)):
            registry.register(collector)

        def counter(name: str, text: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(PREFIX + name, text, ["model", *labels], registry=registry)

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, text, ["model"], registry=registry, buckets=buckets)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that reached the engine.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated, all choices together.")
        self.finished = counter(
            "requests_finished",
            "Requests that ended OK, by finish_reason; a request of n choices counts once per choice.",
            ["finish_reason"],
        )
        self.failures = counter(
            "request_failures", "Chat calls that ended with an error status, by gRPC code.", ["code"]
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "From the call's arrival to its first token.", _LATENCY_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "A request's mean time between tokens: from its first token to its last, over the tokens after the first "
            "(of each choice).",
            _INTER_TOKEN_BUCKETS,
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "From the call's arrival to its end, for calls that reached the engine.",
            _REQUEST_BUCKETS,
        )  # fmt: skip
        self.queue_time = histogram(
            "request_queue_time_seconds", "From entering the queue to taking a sequence slot.", _LATENCY_BUCKETS
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "From taking a slot to the first token sampled.", _LATENCY_BUCKETS
        )

    def model_label(self, model: str | None) -> str:
        return model if model in self._served else UNSERVED_MODEL

    def call_ended(self, record: CallRecord) -> None:
        """Counts and observes one chat call from its record (after its access line)."""
        model = self.model_label(record.model)
        if record.status != "OK":
            self.failures.labels(model, record.status).inc()
        else:
            for reason in record.finish_reasons:
                self.finished.labels(model, reason).inc()
        engine = record.engine
        if engine is None:
            return  # refused before it was queued: it used no engine time
        self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        self.generation_tokens.labels(model).inc(record.completion_tokens)
        self.e2e_latency.labels(model).observe(record.ended - record.started)
        if engine.admitted_at is not None:
            self.queue_time.labels(model).observe(engine.admitted_at - engine.queued_at)
            if engine.first_token_at is not None:
                self.prefill_time.labels(model).observe(engine.first_token_at - engine.admitted_at)
        if record.first_token is not None:
            self.time_to_first_token.labels(model).observe(record.first_token - record.started)
            per_choice = record.completion_tokens / max(1, len(record.finish_reasons))
            if record.last_token is not None and per_choice > 1:
                gaps = per_choice - 1
                self.inter_token_latency.labels(model).observe((record.last_token - record.first_token) / gaps)

    def serve(self, host: str, port: int, tls: ServerTLS | None = None) -> None:
        """Serves /metrics on host:port from a daemon thread of prometheus_client's; with the gRPC
        server's TLS when it has one, client certificates included (Prometheus's scrape config
        gives its own in `tls_config`): a non-loopback address is allowed by the same rule."""
        files = {}
        if tls is not None:
            files = {"certfile": tls.cert.path, "keyfile": tls.key.path}
            if tls.client_ca is not None:
                files |= {"client_cafile": tls.client_ca.path, "client_auth_required": True}
        server, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry, **files)
        scheme = "https" if tls is not None else "http"
        log.warning("metrics at %s://%s:%d/metrics", scheme, host, server.server_port)
