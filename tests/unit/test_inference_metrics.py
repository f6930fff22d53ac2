"""The Prometheus export of the pool client's counters, scraped from a fresh registry after
requests to httpx.MockTransport servers."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inference import Endpoint, InferenceClient, InferenceCollector, Unavailable
from tests.support.streaming_model import streamed
from tests.unit.test_inference import MESSAGES, Recorder
from tests.unit.test_inference_pool import vllm_metrics

A = "http://gpu-a:8000"
G = "http://guard:8000"


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by name and sorted labels."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def at(url: str, role: str = "chat", **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"endpoint": url, "role": role, **extra}.items()))


def handler(request: httpx.Request) -> httpx.Response:
    if request.url.host == "guard":
        return httpx.Response(503, json={"error": {"code": "EngineDead"}})
    if request.url.path == "/health":
        return httpx.Response(200)
    if request.url.path == "/metrics":
        text = vllm_metrics(waiting=2, running=5, usage=0.5) + (
            'vllm:request_queue_time_seconds_sum{engine="0"} 1.5\n'
            'vllm:request_queue_time_seconds_count{engine="0"} 6\n'
        )
        return httpx.Response(200, text=text)
    return httpx.Response(
        200, content=streamed("Hi", " there."), headers={"Content-Type": "text/event-stream"}
    )


@pytest.fixture
def client() -> InferenceClient:
    return Recorder(handler).client(Endpoint(A), Endpoint(G, role="guard"), breaker_failures=1)


def test_the_scrape_follows_requests_errors_and_checks(client: InferenceClient) -> None:
    registry = CollectorRegistry()
    registry.register(InferenceCollector(client))
    with client:
        before = scrape(registry)
        client.chat(MESSAGES)
        client.chat(MESSAGES)
        with pytest.raises(Unavailable):
            client.chat(MESSAGES, role="guard")
        client.health()
        after = scrape(registry)

    assert all(name.startswith("parley_inference_") for name, _ in after)
    assert before[("parley_inference_requests_total", at(A))] == 0
    assert before[("parley_inference_time_to_first_token_seconds_count", at(A))] == 0
    assert ("parley_inference_server_waiting_requests", at(A)) not in before

    assert after[("parley_inference_requests_total", at(A))] == 2
    assert after[("parley_inference_prompt_tokens_total", at(A))] == 42
    assert after[("parley_inference_completion_tokens_total", at(A))] == 8
    assert after[("parley_inference_time_to_first_token_seconds_count", at(A))] == 2
    assert after[("parley_inference_time_to_first_token_seconds_bucket", at(A, le="+Inf"))] == 2
    assert after[("parley_inference_generation_seconds_count", at(A))] == 2
    assert after[("parley_inference_generation_seconds_sum", at(A))] >= 0
    assert after[("parley_inference_in_flight", at(A))] == 0

    assert after[("parley_inference_requests_total", at(G, "guard"))] == 1
    assert after[("parley_inference_errors_total", at(G, "guard", kind="unavailable"))] == 1
    assert ("parley_inference_errors_total", at(A, kind="unavailable")) not in after
    assert after[("parley_inference_breaker_state", at(G, "guard", state="open"))] == 1
    assert after[("parley_inference_breaker_state", at(G, "guard", state="closed"))] == 0
    assert after[("parley_inference_healthy", at(G, "guard"))] == 0

    assert after[("parley_inference_healthy", at(A))] == 1
    assert after[("parley_inference_server_waiting_requests", at(A))] == 2
    assert after[("parley_inference_server_running_requests", at(A))] == 5
    assert after[("parley_inference_server_kv_cache_usage", at(A))] == 0.5
    assert after[("parley_inference_server_queue_seconds_sum", at(A))] == 1.5
    assert after[("parley_inference_server_queue_seconds_count", at(A))] == 6


def test_buckets_are_cumulative(client: InferenceClient) -> None:
    registry = CollectorRegistry()
    registry.register(InferenceCollector(client))
    with client:
        client.chat(MESSAGES)
        samples = scrape(registry)

    name = "parley_inference_time_to_first_token_seconds_bucket"
    bounds = sorted(
        (float(dict(labels)["le"]), value)
        for (metric, labels), value in samples.items()
        if metric == name and dict(labels)["endpoint"] == A
    )
    counts = [value for _, value in bounds]
    assert counts == sorted(counts)
    assert counts[-1] == 1
