"""The pool client against real HTTP servers that stream slowly and watch their sockets:
an abandoned or timed-out request is closed (the server sees the client leave, as vLLM does
before aborting), a completed one leaves its connection for reuse, the Prometheus export
follows real requests, and a ``dns+http://localhost`` entry reaches servers on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inference import (
    Endpoint,
    InferenceClient,
    InferenceCollector,
    PoolConfig,
    Timeout,
    parse_endpoints,
)
from tests.support.streaming_model import StreamingModel
from tests.support.tripwire import SoftTimeLimit

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
NO_CHECKS = PoolConfig(health_interval=0)


@pytest.fixture
def model() -> Iterator[StreamingModel]:
    server = StreamingModel(tokens=3)
    yield server
    server.close()


def client_for(*servers: StreamingModel, timeout: float = 60) -> InferenceClient:
    endpoints = [Endpoint(server.url, model="slow") for server in servers]
    return InferenceClient(endpoints, pool=NO_CHECKS, timeout=timeout)


def test_a_soft_time_limit_mid_stream_closes_the_connection(model: StreamingModel) -> None:
    abandoned = str(uuid.uuid4())
    with SoftTimeLimit() as limit, client_for(model) as client:
        first = client.chat(MESSAGES)
        second = client.chat(MESSAGES)
        model.tokens, model.interval = 100_000, 0.01

        def fire(request_id: str, sent: int) -> None:
            if request_id == abandoned and sent == 3:
                limit.fire()  # from the server's thread, while the client waits in a read

        model.on_chunk = fire
        with pytest.raises(SoftTimeLimitExceeded):
            client.chat(MESSAGES, request_id=abandoned)
        outcome = model.wait_ended(abandoned)
        model.tokens, model.on_chunk = 3, None
        after = client.chat(MESSAGES)
        (stats,) = client.stats()

    assert first.text == "tok1 tok2 tok3" and first.completion_tokens == 3
    assert outcome == "disconnected"
    peers = model.peers
    # a finished stream leaves its connection for the next request; the abandoned one is
    # closed, so the request after it opens a new connection
    assert peers[second.request_id] == peers[first.request_id]
    assert peers[abandoned] == peers[first.request_id]
    assert peers[after.request_id] != peers[abandoned]
    # the server records the end just after the client has read the last chunk
    ended = [model.wait_ended(r.request_id) for r in (first, second, after)]
    assert ended == ["completed"] * 3
    assert (stats.in_flight, stats.error_kinds, stats.state) == (0, {"abandoned": 1}, "closed")


def test_the_call_timeout_closes_a_stalled_stream(model: StreamingModel) -> None:
    model.tokens, model.stall_after = 100, 2
    request_id = str(uuid.uuid4())
    with client_for(model, timeout=30) as client:
        with pytest.raises(Timeout, match="closed") as info:
            client.chat(MESSAGES, request_id=request_id, timeout=1.0)
        (stats,) = client.stats()

    assert info.value.endpoint == model.url
    assert model.wait_ended(request_id) == "disconnected"
    assert stats.error_kinds == {"timeout": 1}


def test_the_scrape_follows_real_requests(model: StreamingModel) -> None:
    registry = CollectorRegistry()
    with client_for(model) as client:
        registry.register(InferenceCollector(client))
        client.chat(MESSAGES)
        client.chat(MESSAGES)
        client.health()
        text = generate_latest(registry).decode()

    samples = {
        (s.name, s.labels.get("endpoint")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("le") is None
    }
    assert samples[("parley_inference_requests_total", model.url)] == 2
    assert samples[("parley_inference_completion_tokens_total", model.url)] == 6
    assert samples[("parley_inference_time_to_first_token_seconds_count", model.url)] == 2
    assert samples[("parley_inference_generation_seconds_count", model.url)] == 2
    # read from the server's own vllm:request_queue_time_seconds by the health check
    assert samples[("parley_inference_server_queue_seconds_count", model.url)] == 2
    assert samples[("parley_inference_server_queue_seconds_sum", model.url)] == 0.5
    assert samples[("parley_inference_healthy", model.url)] == 1


def test_a_dns_entry_for_localhost_reaches_the_servers_behind_it() -> None:
    servers = [StreamingModel(tokens=2), StreamingModel(tokens=2)]
    try:
        spec = ",".join(f"dns+http://localhost:{s.port}#model=slow" for s in servers)
        with InferenceClient(parse_endpoints(spec), pool=NO_CHECKS) as client:
            assert client.endpoints == tuple(
                Endpoint(f"http://127.0.0.1:{s.port}", model="slow") for s in servers
            )
            used = {client.chat(MESSAGES, conversation_key=f"c-{n}").endpoint for n in range(20)}
    finally:
        for server in servers:
            server.close()

    assert used == {s.url for s in servers}
    assert all(body["model"] == "slow" for s in servers for body in s.bodies)
