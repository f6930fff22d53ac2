"""The pool client's routing, spill, breakers and counters, against httpx.MockTransport servers
speaking the OpenAI chat-completions and vLLM ``/metrics`` wire formats."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from inference import (
    BadRequest,
    Endpoint,
    InferenceClient,
    PoolConfig,
    Unavailable,
    parse_endpoints,
)
from inference._pool import parse_metrics
from tests.support.streaming_model import streamed
from tests.unit.test_inference import MESSAGES, Handler, Recorder, completion, ok

URLS = [f"http://gpu-{n}:8000" for n in range(4)]
KEYS = [f"conversation-{n}" for n in range(10_000)]


class Clock:
    """A monotonic clock the test moves by hand, so breaker cooldowns need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client_for(handler: Handler, urls: list[str], **pool: Any) -> tuple[Recorder, InferenceClient]:
    recorder = Recorder(handler)
    clock = pool.pop("clock", Clock())
    config = PoolConfig(**{"health_interval": 0, **pool})
    client = InferenceClient(
        [Endpoint(url) for url in urls], transport=recorder.transport, pool=config, clock=clock
    )
    return recorder, client


def by_url(client: InferenceClient) -> dict[str, Any]:
    return {stats.url: stats for stats in client.stats()}


def vllm_metrics(waiting: float, running: float = 3, usage: float = 0.25) -> str:
    return (
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="meta-llama/Llama-3.1-8B"}} {waiting}\n'
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="meta-llama/Llama-3.1-8B"}} {running}\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="meta-llama/Llama-3.1-8B"}} {usage}\n'
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1.2e+03\n'
    )


# --- affinity --------------------------------------------------------------------------------


def test_every_turn_of_a_conversation_goes_to_the_same_server() -> None:
    recorder, client = client_for(ok, URLS)
    owners: dict[str, set[str]] = {}
    with client:
        for turn in range(3):
            for n in range(40):
                key = f"conversation-{n}"
                result = client.chat(MESSAGES, conversation_key=key)
                owners.setdefault(key, set()).add(result.endpoint)
                if turn == 0:
                    assert client.route(key)[0].url == result.endpoint

    assert all(len(urls) == 1 for urls in owners.values())
    # the conversations spread over the pool instead of all landing on one server
    assert len({url for urls in owners.values() for url in urls}) == len(URLS)
    assert sum(stats.requests for stats in client.stats()) == 120


def test_integer_and_string_keys_route_alike() -> None:
    _, client = client_for(ok, URLS)
    with client:
        assert client.route(123) == client.route("123")


def test_no_key_keeps_the_configured_order() -> None:
    _, client = client_for(ok, URLS)
    with client:
        assert [endpoint.url for endpoint in client.route()] == URLS


def owners(client: InferenceClient) -> dict[str, str]:
    return {key: client.route(key)[0].url for key in KEYS}


def test_adding_a_server_moves_only_its_share_of_conversations() -> None:
    _, four = client_for(ok, URLS)
    _, five = client_for(ok, [*URLS, "http://gpu-new:8000"])
    with four, five:
        before, after = owners(four), owners(five)

    moved = [key for key in KEYS if before[key] != after[key]]
    assert {after[key] for key in moved} == {"http://gpu-new:8000"}
    assert 0.17 < len(moved) / len(KEYS) < 0.23  # ~1/5
    assert Counter(before.values()).keys() == set(URLS)


def test_removing_a_server_moves_only_its_conversations() -> None:
    _, four = client_for(ok, URLS)
    _, three = client_for(ok, URLS[:3])
    with four, three:
        before, after = owners(four), owners(three)

    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == URLS[3]}
    assert 0.2 < len(moved) / len(KEYS) < 0.3  # ~1/4


# --- spill -----------------------------------------------------------------------------------


def test_spills_to_the_next_server_when_the_owner_is_at_its_cap() -> None:
    key = "conversation-7"
    nested: list[str] = []
    depth = [0]
    client: InferenceClient

    def handler(request: httpx.Request) -> httpx.Response:
        # While the owner is handling this turn, a second request of the same conversation
        # arrives: the owner is at its cap of one, so it goes to the next in order.
        depth[0] += 1
        if depth[0] == 1:
            nested.append(client.chat(MESSAGES, conversation_key=key).endpoint)
        return ok(request)

    recorder, client = client_for(handler, URLS[:2], max_in_flight=1)
    with client:
        first, second = (endpoint.url for endpoint in client.route(key))
        assert client.chat(MESSAGES, conversation_key=key).endpoint == first
        stats = by_url(client)
        # back under the cap: the conversation is home again
        assert client.chat(MESSAGES, conversation_key=key).endpoint == first

    assert nested == [second]
    assert stats[first].spilled == 1
    assert stats[first].in_flight == stats[second].in_flight == 0
    assert recorder.hosts.count(httpx.URL(second).host) == 1


def test_an_endpoint_cap_overrides_the_pool_default() -> None:
    spec = f"{URLS[0]}#max_in_flight=0,{URLS[1]}#max_in_flight=1"
    seen: list[str] = []
    depth = [0]
    client: InferenceClient

    def handler(request: httpx.Request) -> httpx.Response:
        # each request, while open, sends one more: three are in flight at the deepest point
        depth[0] += 1
        if depth[0] < 3:
            seen.append(client.chat(MESSAGES).endpoint)
        return ok(request)

    recorder = Recorder(handler)
    client = InferenceClient(
        parse_endpoints(spec),
        transport=recorder.transport,
        pool=PoolConfig(max_in_flight=1, health_interval=0),
    )
    with client:
        client.chat(MESSAGES)

    # gpu-0 has no cap (0), so nested requests keep going to it despite the pool's cap of 1
    assert seen == [URLS[0]] * 2
    assert recorder.hosts == ["gpu-0"] * 3


def test_spills_when_the_owner_reports_a_long_waiting_queue() -> None:
    key = "conversation-42"
    waiting = {"gpu-0": 20.0, "gpu-1": 0.0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/metrics":
            text = vllm_metrics(waiting[request.url.host])
            return httpx.Response(200, text=text, headers={"Content-Type": "text/plain"})
        return ok(request)

    _, client = client_for(handler, URLS[:2], spill_waiting=8)
    with client:
        owner = client.route(key)[0].url
        if owner != URLS[0]:
            waiting = {"gpu-0": 0.0, "gpu-1": 20.0}
        other = URLS[1] if owner == URLS[0] else URLS[0]
        client.health()
        stats = by_url(client)
        spilled_to = client.chat(MESSAGES, conversation_key=key).endpoint
        waiting = dict.fromkeys(waiting, 0.0)
        client.health()
        back_to = client.chat(MESSAGES, conversation_key=key).endpoint

    assert (stats[owner].waiting, stats[owner].running, stats[owner].kv_cache_usage) == (
        20.0,
        3.0,
        0.25,
    )
    assert spilled_to == other
    assert back_to == owner
    assert by_url(client)[owner].spilled == 1


def test_every_server_saturated_keeps_the_owner() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=vllm_metrics(50))
        return ok(request) if request.url.path == _CHAT else httpx.Response(200)

    _, client = client_for(handler, URLS, spill_waiting=8)
    with client:
        owner = client.route("k")[0]
        client.health()
        assert client.chat(MESSAGES, conversation_key="k").endpoint == owner.url


_CHAT = "/v1/chat/completions"


# --- failover and breakers -------------------------------------------------------------------


def test_connect_error_fails_over_to_the_next_server_in_rendezvous_order() -> None:
    key = "conversation-9"
    _, probe = client_for(ok, URLS)
    with probe:
        first, second, *_ = (endpoint.url for endpoint in probe.route(key))

    def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url).startswith(first):
            raise httpx.ConnectError("connection refused", request=request)
        return ok(request)

    recorder, client = client_for(handler, URLS)
    with client:
        result = client.chat(MESSAGES, conversation_key=key)
        stats = by_url(client)

    assert result.endpoint == second
    assert [r.url.host for r in recorder.requests] == [
        httpx.URL(first).host,
        httpx.URL(second).host,
    ]
    assert (stats[first].requests, stats[first].errors, stats[first].state) == (1, 1, "closed")
    assert stats[first].consecutive_failures == 1
    assert (stats[second].requests, stats[second].errors) == (1, 0)


def test_breaker_opens_after_consecutive_failures_and_probes_after_the_cooldown() -> None:
    clock = Clock()
    down = {"gpu-0": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gpu-0" and down["gpu-0"]:
            return httpx.Response(503, json={"error": {"message": "engine dead"}})
        return ok(request)

    recorder, client = client_for(
        handler, URLS[:2], breaker_failures=2, breaker_cooldown=30, clock=clock
    )
    with client:
        for _ in range(2):
            with pytest.raises(Unavailable):
                client.chat(MESSAGES)  # a 5xx may have run: never resent
        assert by_url(client)[URLS[0]].state == "open"
        # open: requests go straight to the next server
        assert client.chat(MESSAGES).endpoint == URLS[1]
        clock.now += 29.9
        assert client.chat(MESSAGES).endpoint == URLS[1]
        clock.now += 0.1
        assert by_url(client)[URLS[0]].state == "half_open"
        # the half-open probe is a real request; it fails, so the breaker opens again
        with pytest.raises(Unavailable):
            client.chat(MESSAGES)
        assert by_url(client)[URLS[0]].state == "open"
        clock.now += 30
        down["gpu-0"] = False
        assert client.chat(MESSAGES).endpoint == URLS[0]
        stats = by_url(client)[URLS[0]]

    assert recorder.hosts == ["gpu-0", "gpu-0", "gpu-1", "gpu-1", "gpu-0", "gpu-0"]
    assert (stats.state, stats.consecutive_failures, stats.probes) == ("closed", 0, 2)
    assert (stats.requests, stats.errors) == (4, 3)


def test_a_half_open_server_takes_one_probe_at_a_time() -> None:
    clock = Clock()
    seen: list[str] = []
    client: InferenceClient
    state = {"failing": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if state["failing"]:
            raise httpx.ConnectError("refused", request=request)
        if request.url.host == "gpu-0" and not seen:
            # the probe is out: a concurrent request must not pile onto the same server
            seen.append(client.route()[0].url)
        return ok(request)

    _, client = client_for(handler, URLS[:2], breaker_failures=1, breaker_cooldown=5, clock=clock)
    with client:
        with pytest.raises(Unavailable):
            client.chat(MESSAGES)  # both refuse: both open
        assert {s.state for s in client.stats()} == {"open"}
        state["failing"] = False
        clock.now += 5
        assert client.chat(MESSAGES).endpoint == URLS[0]

    assert seen == [URLS[1]]


def test_client_errors_do_not_count_against_a_server() -> None:
    recorder, client = client_for(
        lambda request: httpx.Response(400, json={"error": {"code": "bad_param"}}),
        URLS[:1],
        breaker_failures=1,
    )
    with client:
        for _ in range(3):
            with pytest.raises(BadRequest):
                client.chat(MESSAGES)
        stats = by_url(client)[URLS[0]]

    assert (stats.state, stats.errors, stats.consecutive_failures) == ("closed", 3, 0)
    assert len(recorder.requests) == 3


def test_with_every_breaker_open_the_servers_are_tried_anyway() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise httpx.ConnectError("refused", request=request)
        return ok(request)

    recorder, client = client_for(handler, URLS[:2], breaker_failures=1)
    with client:
        with pytest.raises(Unavailable):
            client.chat(MESSAGES)
        # better a try on a server believed dead than no answer at all
        assert client.chat(MESSAGES).endpoint == URLS[0]

    assert recorder.hosts == ["gpu-0", "gpu-1", "gpu-0"]


# --- active health ---------------------------------------------------------------------------


def test_health_falls_back_to_models_and_skips_missing_metrics() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":  # llama.cpp's server: no /health, no /metrics
            return httpx.Response(200, json={"object": "list", "data": [{"id": "smollm2"}]})
        return httpx.Response(404, json={"detail": "Not Found"})

    recorder, client = client_for(handler, URLS[:1])
    with client:
        (first,) = client.health()
        client.health()
        stats = by_url(client)[URLS[0]]

    assert first[1:] == (True, "/v1/models: HTTP 200")
    assert [r.url.path for r in recorder.requests] == [
        "/health",
        "/v1/models",
        "/metrics",
        "/health",
        "/v1/models",
    ]
    assert (stats.healthy, stats.waiting, stats.state) == (True, None, "closed")


def test_failed_checks_open_the_breaker_and_a_passed_check_after_cooldown_closes_it() -> None:
    clock = Clock()
    up = {"ok": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if not up["ok"]:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200) if request.url.path == "/health" else httpx.Response(404)

    _, client = client_for(handler, URLS[:2], breaker_failures=2, breaker_cooldown=10, clock=clock)
    with client:
        client.health()
        assert by_url(client)[URLS[0]].state == "closed"
        client.health()
        assert by_url(client)[URLS[0]].state == "open"
        up["ok"] = True
        client.health()  # healthy again, but still inside the cooldown: stays ejected
        assert by_url(client)[URLS[0]].state == "open"
        clock.now += 10
        client.health()
        stats = by_url(client)[URLS[0]]

    assert (stats.state, stats.probes, stats.healthy) == ("closed", 1, True)


def test_health_checks_run_on_a_thread_started_by_chat_and_stopped_by_close() -> None:
    def monitors() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "inference-health"}

    _, client = client_for(ok, URLS[:1], health_interval=3600)
    others = monitors()  # clients of other tests in this process may run their own
    with client:
        assert monitors() == others
        client.chat(MESSAGES)
        client.chat(MESSAGES)
        (monitor,) = monitors() - others
        assert monitor.daemon
    assert not monitor.is_alive()


# --- request body and counters ---------------------------------------------------------------


def test_cache_salt_is_sent_when_given() -> None:
    recorder, client = client_for(ok, URLS[:1])
    with client:
        client.chat(MESSAGES, cache_salt="workspace-17", conversation_key=5)
        client.chat(MESSAGES)
        with pytest.raises(ValueError, match="cache_salt"):
            client.chat(MESSAGES, cache_salt="")

    bodies = [json.loads(request.content) for request in recorder.requests]
    assert bodies[0]["cache_salt"] == "workspace-17"
    assert "cache_salt" not in bodies[1]
    assert len(bodies) == 2


def test_counters_add_up_tokens_and_timings() -> None:
    bodies = iter(
        [streamed("Hello", " there."), streamed("Hi."), json.dumps(completion()).encode()]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        content = next(bodies)
        kind = "application/json" if content.startswith(b"{") else "text/event-stream"
        return httpx.Response(200, content=content, headers={"Content-Type": kind})

    _, client = client_for(handler, URLS[:1])
    with client:
        assert client.chat(MESSAGES).text == "Hello there."
        client.chat(MESSAGES)
        client.chat(MESSAGES)  # a server that ignored `stream` and sent one JSON body
        stats = by_url(client)[URLS[0]]

    assert (stats.requests, stats.errors, stats.in_flight) == (3, 0, 0)
    assert (stats.prompt_tokens, stats.completion_tokens) == (63, 12)
    # the JSON answer has no first chunk: its whole time counts as generation
    assert (stats.ttft.count, stats.generation.count) == (2, 3)
    assert stats.ttft.buckets[-1] == 2  # every observation is under the last bound
    assert stats.generation.sum_s >= 0


# --- parsing and settings --------------------------------------------------------------------


def test_parse_metrics_handles_labels_comments_and_odd_values() -> None:
    text = (
        "# HELP x a help line with } and {\n"
        'vllm:num_requests_waiting{model_name="a b}",engine="0"} 2\n'
        'vllm:num_requests_waiting{model_name="say \\"hi\\"",engine="1"} 3.5 1712345678\n'
        "vllm:num_requests_running 7\n"
        "vllm:kv_cache_usage_perc NaN\n"
        "garbage\n"
        "broken{unterminated 5\n"
        "\n"
    )
    assert parse_metrics(text) == {
        "vllm:num_requests_waiting": [2.0, 3.5],
        "vllm:num_requests_running": [7.0],
        "vllm:kv_cache_usage_perc": [pytest.approx(float("nan"), nan_ok=True)],
    }


def test_endpoint_caps_in_specs_and_pool_files(tmp_path: Path) -> None:
    assert parse_endpoints(f"{URLS[0]}#max_in_flight=4&role=guard") == [
        Endpoint(URLS[0], role="guard", max_in_flight=4)
    ]
    pool = tmp_path / "pool.yaml"
    pool.write_text(f"endpoints: [{{url: '{URLS[1]}', max_in_flight: 16}}]\n", encoding="utf-8")
    assert parse_endpoints(f"@{pool}") == [Endpoint(URLS[1], max_in_flight=16)]
    for bad in (f"{URLS[0]}#max_in_flight=-1", f"{URLS[0]}#max_in_flight=many"):
        with pytest.raises(ValueError, match="max_in_flight"):
            parse_endpoints(bad)


def test_pool_config_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        inference_max_in_flight=5,
        inference_spill_waiting=0,
        inference_breaker_failures=7,
        inference_breaker_cooldown=2.5,
        inference_health_interval=0,
        inference_dns_interval=4,
    )
    assert PoolConfig.from_settings(settings) == PoolConfig(
        max_in_flight=5,
        spill_waiting=0,
        breaker_failures=7,
        breaker_cooldown=2.5,
        health_interval=0,
        dns_interval=4,
    )
    with pytest.raises(ValueError, match="breaker_failures"):
        PoolConfig(breaker_failures=0)
    with pytest.raises(ValueError, match="dns_interval"):
        PoolConfig(dns_interval=0)
