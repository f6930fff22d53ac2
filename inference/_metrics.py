"""Prometheus export of the pool client's per-endpoint counters and timings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from ._pool import TIMING_BUCKETS, EndpointStats, Timing

if TYPE_CHECKING:
    from ._client import InferenceClient

_LABELS = ["endpoint", "role"]
_STATES = ("closed", "open", "half_open")


class InferenceCollector(Collector):
    """Reads ``client.stats()`` at every scrape; register it on a ``CollectorRegistry``.

    Every metric is named ``parley_inference_*`` and labelled by ``endpoint`` (base URL)
    and ``role``; the figures are this process's since the client was built (an endpoint
    that left a DNS-discovered pool drops out). The gauges read from a server's own
    ``/metrics`` (``server_*``) appear once a health check has read them.
    """

    def __init__(self, client: InferenceClient) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        stats = self._client.stats()

        def counter(name: str, doc: str, value: Callable[[EndpointStats], float]) -> Metric:
            family = CounterMetricFamily(f"parley_inference_{name}", doc, labels=_LABELS)
            for s in stats:
                family.add_metric([s.url, s.role], value(s))
            return family

        def gauge(name: str, doc: str, value: Callable[[EndpointStats], float | None]) -> Metric:
            family = GaugeMetricFamily(f"parley_inference_{name}", doc, labels=_LABELS)
            for s in stats:
                reading = value(s)
                if reading is not None:
                    family.add_metric([s.url, s.role], reading)
            return family

        def histogram(name: str, doc: str, value: Callable[[EndpointStats], Timing]) -> Metric:
            family = HistogramMetricFamily(f"parley_inference_{name}", doc, labels=_LABELS)
            for s in stats:
                timing = value(s)
                buckets = [
                    (_bound(bound), float(n))
                    for bound, n in zip(TIMING_BUCKETS, timing.buckets, strict=True)
                ]
                buckets.append(("+Inf", float(timing.count)))
                family.add_metric([s.url, s.role], buckets, sum_value=timing.sum_s)
            return family

        yield counter(
            "requests", "Requests sent (each failover attempt counts).", lambda s: s.requests
        )
        errors = CounterMetricFamily(
            "parley_inference_errors",
            "Failed requests by kind: connect, timeout, unavailable, bad_request, "
            "context_too_long, bad_response, abandoned.",
            labels=[*_LABELS, "kind"],
        )
        for s in stats:
            for kind, count in sorted(s.error_kinds.items()):
                errors.add_metric([s.url, s.role, kind], count)
        yield errors
        yield counter(
            "prompt_tokens", "Prompt tokens the server reported.", lambda s: s.prompt_tokens
        )
        yield counter(
            "completion_tokens",
            "Completion tokens the server reported.",
            lambda s: s.completion_tokens,
        )
        yield histogram(
            "time_to_first_token_seconds",
            "From sending a request to its first streamed chunk (successful requests).",
            lambda s: s.ttft,
        )
        yield histogram(
            "generation_seconds",
            "From the first streamed chunk to the end of the stream (successful requests).",
            lambda s: s.generation,
        )
        yield counter(
            "spilled",
            "Requests of conversations owned by this server sent elsewhere (saturated).",
            lambda s: s.spilled,
        )
        yield counter("probes", "Half-open breaker probes.", lambda s: s.probes)
        yield gauge("in_flight", "Requests open now from this process.", lambda s: s.in_flight)
        breaker = GaugeMetricFamily(
            "parley_inference_breaker_state",
            "1 for the circuit breaker's current state, 0 for the others.",
            labels=[*_LABELS, "state"],
        )
        for s in stats:
            for state in _STATES:
                breaker.add_metric([s.url, s.role, state], float(s.state == state))
        yield breaker
        yield gauge(
            "healthy",
            "1 when the last active check passed, else 0.",
            lambda s: None if s.healthy is None else float(s.healthy),
        )
        yield gauge(
            "server_waiting_requests",
            "vllm:num_requests_waiting at the last check.",
            lambda s: s.waiting,
        )
        yield gauge(
            "server_running_requests",
            "vllm:num_requests_running at the last check.",
            lambda s: s.running,
        )
        yield gauge(
            "server_kv_cache_usage",
            "vllm:kv_cache_usage_perc (0-1) at the last check.",
            lambda s: s.kv_cache_usage,
        )
        queue = SummaryMetricFamily(
            "parley_inference_server_queue_seconds",
            "The server's vllm:request_queue_time_seconds sum and count at the last check "
            "(every client of that server, not only this process).",
            labels=_LABELS,
        )
        for s in stats:
            if s.queue_wait_s is not None and s.queue_wait_count is not None:
                queue.add_metric([s.url, s.role], int(s.queue_wait_count), s.queue_wait_s)
        yield queue


def _bound(bound: float) -> str:
    return repr(float(bound))
