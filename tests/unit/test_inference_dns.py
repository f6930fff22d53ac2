"""Endpoints discovered through DNS (``dns+http://``, Kubernetes headless services), with a
resolver injected, against httpx.MockTransport servers."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from inference import Endpoint, InferenceClient, PoolConfig, Unavailable, parse_endpoints
from inference._endpoints import expand
from tests.unit.test_inference import MESSAGES, Recorder, ok

SERVICE = "dns+http://vllm-headless.llm.svc:8000"
KEYS = [f"conversation-{n}" for n in range(10_000)]


class Resolver:
    """Answers from ``records``; a name missing from it fails as an unknown name does."""

    def __init__(self, **records: list[str]) -> None:
        self.records = records
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        key = host.replace(".", "_").replace("-", "_")
        if key not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.records[key])


PODS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
NAME = "vllm_headless_llm_svc"


def client_for(resolver: Resolver, spec: str = SERVICE, **pool: float) -> InferenceClient:
    config = PoolConfig(**{"health_interval": 0, **pool})  # type: ignore[arg-type]
    return InferenceClient(
        parse_endpoints(spec), transport=Recorder(ok).transport, pool=config, resolver=resolver
    )


def owners(client: InferenceClient) -> dict[str, str]:
    return {key: client.route(key)[0].url for key in KEYS}


# --- the spec --------------------------------------------------------------------------------


def test_a_dns_item_keeps_its_options_and_is_marked(tmp_path: Path) -> None:
    spec = f"http://static:8000,{SERVICE}/v1/#model=llama&role=guard&max_in_flight=4"
    static, entry = parse_endpoints(spec)
    assert entry == Endpoint(SERVICE, model="llama", role="guard", max_in_flight=4)
    assert entry.discovered_by_dns and not static.discovered_by_dns

    pool = tmp_path / "pool.yaml"
    pool.write_text(f"endpoints: [{{url: '{SERVICE}/prefix', model: llama}}]\n", encoding="utf-8")
    assert parse_endpoints(f"@{pool}") == [Endpoint(f"{SERVICE}/prefix", model="llama")]


@pytest.mark.parametrize("spec", ["dns+https://vllm:8000", "dns+ftp://vllm", "dns+http://"])
def test_bad_dns_items_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="bad endpoint"):
        parse_endpoints(spec)


def test_expand_makes_one_server_per_address() -> None:
    entry = Endpoint("dns+http://svc/prefix", model="m", role="vision")
    servers = expand(entry, ["10.0.0.9", "fd00::2", "10.0.0.10", "10.0.0.9", "not-an-ip"])
    assert [s.url for s in servers] == [
        "http://10.0.0.9:80/prefix",
        "http://10.0.0.10:80/prefix",
        "http://[fd00::2]:80/prefix",
    ]
    assert {(s.model, s.role) for s in servers} == {("m", "vision")}


# --- membership ------------------------------------------------------------------------------


def test_each_address_becomes_a_server_in_place_of_the_item() -> None:
    resolver = Resolver(**{NAME: PODS})
    spec = f"http://first:8000,{SERVICE}#model=llama,http://last:8000"
    with client_for(resolver, spec) as client:
        assert [e.url for e in client.endpoints] == [
            "http://first:8000",
            *(f"http://{pod}:8000" for pod in PODS),
            "http://last:8000",
        ]
        assert {e.model for e in client.endpoints[1:5]} == {"llama"}
        result = client.chat(MESSAGES, conversation_key="c-1")

    assert resolver.calls == [("vllm-headless.llm.svc", 8000)]
    assert result.endpoint == client.route("c-1")[0].url


def test_a_new_address_takes_only_its_share_of_conversations() -> None:
    resolver = Resolver(**{NAME: PODS})
    with client_for(resolver) as client:
        client.chat(MESSAGES, conversation_key="c-1")
        before = owners(client)
        served = {s.url: s.requests for s in client.stats()}
        resolver.records[NAME] = [*PODS, "10.0.0.5"]
        with capture_logs() as logs:
            client.refresh()
        after = owners(client)
        kept = {s.url: s.requests for s in client.stats() if s.url in served}

    moved = [key for key in KEYS if before[key] != after[key]]
    assert {after[key] for key in moved} == {"http://10.0.0.5:8000"}
    assert 0.17 < len(moved) / len(KEYS) < 0.23  # ~1/5
    assert kept == served  # the servers that stayed keep their counters
    assert [(e["event"], e["endpoint"]) for e in logs] == [
        ("inference.endpoint_joined", "http://10.0.0.5:8000")
    ]


def test_a_vanished_address_gives_up_only_its_conversations() -> None:
    resolver = Resolver(**{NAME: PODS})
    with client_for(resolver) as client:
        before = owners(client)
        resolver.records[NAME] = PODS[1:]
        client.refresh()
        after = owners(client)
        assert len(client.endpoints) == 3

    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == f"http://{PODS[0]}:8000"}
    assert 0.2 < len(moved) / len(KEYS) < 0.3  # ~1/4


def test_a_failed_resolution_keeps_the_last_addresses() -> None:
    resolver = Resolver(**{NAME: PODS})
    with client_for(resolver) as client:
        del resolver.records[NAME]
        with capture_logs() as logs:
            client.refresh()
        kept = client.endpoints
        assert len(kept) == 4
        assert logs[0]["event"] == "inference.dns_failed"
        assert logs[0]["error"] == "gaierror"
        # an empty answer is not an error: the service really has no server now
        resolver.records[NAME] = []
        assert client.refresh() == ()


def test_a_name_that_never_resolved_is_reported_and_retried_by_the_next_call() -> None:
    resolver = Resolver()
    with client_for(resolver, f"{SERVICE}#model=llama") as client:
        assert client.endpoints == ()
        (report,) = client.health()
        assert report == (Endpoint(SERVICE, model="llama"), False, "dns: gaierror")
        with pytest.raises(Unavailable, match="role 'chat'"):
            client.chat(MESSAGES)
        resolver.records[NAME] = ["10.0.0.7"]
        # the pods came up: the next call resolves again instead of failing
        assert client.chat(MESSAGES).endpoint == "http://10.0.0.7:8000"


def test_the_background_thread_re_resolves_without_health_checks() -> None:
    resolver = Resolver(**{NAME: PODS})
    with client_for(resolver, dns_interval=0.01) as client:
        client.chat(MESSAGES)  # starts the background thread
        resolver.records[NAME] = PODS[:2]
        pause = threading.Event()
        for _ in range(3000):  # up to 30 s on a busy machine; usually a few hundredths
            if len(client.endpoints) == 2:
                break
            pause.wait(0.01)
        assert [e.url for e in client.endpoints] == [f"http://{pod}:8000" for pod in PODS[:2]]
    assert len(resolver.calls) >= 2
