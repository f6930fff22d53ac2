"""The pool client against two real vLLM servers on CPU: ``make test-vllm``.

Skipped in the default suite (``PARLEY_TEST_VLLM`` unset): what these tests read exists only on
vLLM — ``/health``, ``/metrics`` with the load gauges and the prefix-cache counters,
``/tokenize``, ``cache_salt``. The same scenarios on llama.cpp are in
``test_inference_failover.py`` and ``test_local_model.py``.

Prefix-cache counters are per server and count prompt tokens: ``queries`` grows by every prompt
token looked up, ``hits`` by those found in the cache (whole KV blocks only). Every test puts a
fresh nonce at the start of its prompts, so nothing cached by an earlier test or run is hit.
The test that kills a server runs last; the fixture starts it again if it ever stays dead.
"""

from __future__ import annotations

import secrets
import threading
import time

import httpx
import pytest

from inference import (
    ContextTooLong,
    Endpoint,
    GenerationParams,
    InferenceClient,
    InferenceError,
    PoolConfig,
    Unavailable,
)
from tests.support.processes import free_port
from tests.support.vllm import (
    KV_CACHE_USAGE,
    MAX_MODEL_LEN,
    PREFIX_HITS,
    PREFIX_QUERIES,
    RUNNING,
    SERVED_MODEL,
    SUCCESS,
    WAITING,
    VllmServer,
    filler,
)

# A cold start of both servers is part of the first test's set-up.
pytestmark = pytest.mark.timeout(1800)

GREEDY = GenerationParams(temperature=0, max_tokens=16, seed=1234)
SALT = "workspace-1"
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def client_for(
    servers: list[VllmServer], *, config: PoolConfig | None = None, clock: Clock | None = None
) -> InferenceClient:
    endpoints = [Endpoint(s.url, model=SERVED_MODEL) for s in servers]
    return InferenceClient(
        endpoints,
        pool=config or PoolConfig(health_interval=0),
        timeout=300,
        clock=clock if clock is not None else time.monotonic,
    )


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def system(nonce: str) -> dict[str, str]:
    return {"role": "system", "content": f"Case {nonce}. You answer for a bakery, briefly."}


def test_reply_usage_and_health_on_vllm(vllm_pair: list[VllmServer]) -> None:
    server = vllm_pair[0]
    with client_for([server]) as client:
        first = client.chat(QUESTION, params=GREEDY, cache_salt=SALT)
        second = client.chat(QUESTION, params=GREEDY, cache_salt=SALT)
        assert first.text
        assert first.text == second.text  # temperature 0 with a seed is repeatable
        assert (first.endpoint, first.model) == (server.url, SERVED_MODEL)
        assert first.prompt_tokens is not None
        assert first.prompt_tokens > 10
        assert first.completion_tokens is not None
        assert 0 < first.completion_tokens <= GREEDY.max_tokens
        assert first.finish_reason in ("stop", "length")

        # vLLM has /health, so the check never falls back to /v1/models, and /metrics
        # gives the load the router reads
        assert [(e.url, ok, detail) for e, ok, detail in client.health()] == [
            (server.url, True, "/health: HTTP 200")
        ]
        stats = client.stats()[0]
        assert (stats.running, stats.waiting) == (0, 0)
        assert stats.kv_cache_usage is not None
        assert 0 <= stats.kv_cache_usage <= 1


def test_metric_names_the_pool_and_the_bench_read(vllm_pair: list[VllmServer]) -> None:
    metrics = vllm_pair[1].metrics()
    for name in (RUNNING, WAITING, KV_CACHE_USAGE, PREFIX_QUERIES, PREFIX_HITS, SUCCESS):
        assert name in metrics, name
    # the V0 name is gone in this version
    assert "vllm:gpu_cache_usage_perc" not in metrics


def test_tokenize_counts_the_chat_prompt_exactly(vllm_pair: list[VllmServer]) -> None:
    server = vllm_pair[0]
    response = httpx.post(
        server.url + "/tokenize",
        json={"model": SERVED_MODEL, "messages": QUESTION},
        timeout=30,
        trust_env=False,
    )
    assert response.status_code == 200
    data = response.json()
    assert data["count"] == len(data["tokens"])
    assert data["max_model_len"] == MAX_MODEL_LEN
    with client_for([server]) as client:
        result = client.chat(QUESTION, params=GREEDY)
    # the chat template with the generation prompt, as the completion counted it
    assert result.prompt_tokens == data["count"]


def test_cache_salt_is_accepted_and_keeps_tenants_apart(vllm_pair: list[VllmServer]) -> None:
    server = vllm_pair[0]
    nonce = secrets.token_hex(4)
    messages = [system(nonce), {"role": "user", "content": filler(nonce, 500)}]
    with client_for([server]) as client:
        client.chat(messages, params=GREEDY, cache_salt="tenant-a")
        before = server.metrics()
        again = client.chat(messages, params=GREEDY, cache_salt="tenant-a")
        same_tenant = server.metrics()
        client.chat(messages, params=GREEDY, cache_salt="tenant-b")
        other_tenant = server.metrics()
    assert again.prompt_tokens is not None
    # the same tenant finds the prompt cached (all but the last partial block) ...
    assert delta(same_tenant, before, PREFIX_HITS) >= 0.5 * again.prompt_tokens
    # ... another tenant sending the very same prompt finds nothing
    assert delta(other_tenant, same_tenant, PREFIX_QUERIES) >= again.prompt_tokens
    assert delta(other_tenant, same_tenant, PREFIX_HITS) == 0


def test_affinity_serves_the_second_turn_from_the_prefix_cache(
    vllm_pair: list[VllmServer],
) -> None:
    nonce = secrets.token_hex(4)
    key = f"conversation-{nonce}"
    by_url = {s.url: s for s in vllm_pair}
    with client_for(vllm_pair) as client:
        owner = by_url[client.route(key)[0].url]
        other = next(s for s in vllm_pair if s is not owner)
        messages = [system(nonce), {"role": "user", "content": filler(nonce, 500)}]
        first = client.chat(messages, params=GREEDY, conversation_key=key, cache_salt=SALT)
        assert first.endpoint == owner.url
        messages += [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": filler(nonce + "-2", 80)},
        ]
        before = {s.url: s.metrics() for s in vllm_pair}
        second = client.chat(messages, params=GREEDY, conversation_key=key, cache_salt=SALT)
        after = {s.url: s.metrics() for s in vllm_pair}
    assert second.endpoint == owner.url
    assert first.prompt_tokens is not None
    assert second.prompt_tokens is not None
    queries = delta(after[owner.url], before[owner.url], PREFIX_QUERIES)
    hits = delta(after[owner.url], before[owner.url], PREFIX_HITS)
    assert queries >= second.prompt_tokens
    # the whole first turn (in full blocks) came from the cache: only the new part ran
    assert hits / queries >= 0.6
    assert hits >= 0.8 * first.prompt_tokens
    assert delta(after[other.url], before[other.url], PREFIX_QUERIES) == 0

    # the same turn on the other server prefills everything again: what affinity saves
    with client_for([other]) as direct:
        start = other.metrics()
        direct.chat(messages, params=GREEDY, cache_salt=SALT)
        end = other.metrics()
    assert delta(end, start, PREFIX_HITS) == 0


def test_prompt_over_the_context_window(vllm_pair: list[VllmServer]) -> None:
    too_long = [{"role": "user", "content": "hello world " * MAX_MODEL_LEN}]
    with client_for(vllm_pair[:1]) as client, pytest.raises(ContextTooLong) as info:
        client.chat(too_long, params=GenerationParams(max_tokens=8))
    assert info.value.endpoint == vllm_pair[0].url
    assert "hello" not in str(info.value)


def test_fails_over_from_a_closed_port(vllm_pair: list[VllmServer]) -> None:
    closed = Endpoint(f"http://127.0.0.1:{free_port()}", model=SERVED_MODEL)
    live = Endpoint(vllm_pair[1].url, model=SERVED_MODEL)
    with InferenceClient([closed, live], pool=PoolConfig(health_interval=0), timeout=300) as c:
        result = c.chat(QUESTION, params=GenerationParams(temperature=0, max_tokens=4))
    assert result.endpoint == live.url


def test_kill_a_server_mid_conversation(vllm_pair: list[VllmServer]) -> None:
    """A server dies while it generates a reply: that request fails and is not sent again,
    the caller's retry moves to the other server and is answered exactly once, the dead
    server is ejected, and the conversation goes home once it is back."""
    if not all(server.owned for server in vllm_pair):
        pytest.skip("the servers were given by URL; this test kills and restarts one")
    clock = Clock()
    config = PoolConfig(breaker_failures=2, breaker_cooldown=30, health_interval=0)
    by_url = {s.url: s for s in vllm_pair}
    with client_for(vllm_pair, config=config, clock=clock) as client:
        keys: dict[str, str] = {}
        for n in range(64):
            keys.setdefault(client.route(f"conversation-{n}")[0].url, f"conversation-{n}")
            if len(keys) == 2:
                break
        pinned, other = vllm_pair if vllm_pair[0].url in keys else vllm_pair[::-1]
        key = keys[pinned.url]

        def ask(conversation: str, text: str, max_tokens: int = 6) -> str:
            params = GenerationParams(temperature=0, max_tokens=max_tokens, seed=1)
            messages = [{"role": "user", "content": text}]
            result = client.chat(
                messages, params=params, conversation_key=conversation, cache_salt=SALT
            )
            assert result.completion_tokens
            return result.endpoint

        for turn in range(2):
            for url, conversation in keys.items():
                assert ask(conversation, f"Say hello, turn {turn}.") == url

        # a long reply is being generated on the pinned server when it dies
        survivor_before = other.metrics()[SUCCESS]
        errors: list[BaseException] = []

        def long_turn() -> None:
            try:
                ask(key, "Write a long story about a bakery, at least 300 words.", 400)
            except BaseException as exc:  # noqa: BLE001  # handed to the test thread
                errors.append(exc)

        worker = threading.Thread(target=long_turn)
        worker.start()
        deadline = time.monotonic() + 120
        while pinned.metrics().get(RUNNING, 0) < 1:
            assert worker.is_alive(), f"the long reply finished before the kill: {errors}"
            assert time.monotonic() < deadline, "the long reply never started"
            time.sleep(0.05)
        pinned.kill()
        worker.join(timeout=60)
        assert not worker.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], Unavailable)
        assert isinstance(errors[0], InferenceError)
        assert errors[0].endpoint == pinned.url
        # the request had reached the dead server, so the client did not send it again
        assert other.metrics()[SUCCESS] == survivor_before

        # the caller's retry of that turn moves and is answered exactly once
        assert ask(key, "Are you still there?") == other.url
        assert other.metrics()[SUCCESS] == survivor_before + 1
        stats = {s.url: s for s in client.stats()}
        assert (stats[pinned.url].errors, stats[pinned.url].state) == (2, "open")

        # with the breaker open the dead server is not tried at all
        tried = stats[pinned.url].requests
        assert ask(key, "And again.") == other.url
        assert {s.url: s.requests for s in client.stats()}[pinned.url] == tried

        # after the cooldown a check probes it; still dead, so it opens again
        clock.now += 30
        healthy = {e.url: ok for e, ok, _ in client.health()}
        assert healthy == {pinned.url: False, other.url: True}
        stats = {s.url: s for s in client.stats()}
        assert (stats[pinned.url].state, stats[pinned.url].probes) == ("open", 1)

        # back on the same port: the next probe closes the breaker and the conversation
        # returns to its own server
        by_url[pinned.url].start()
        clock.now += 30
        client.health()
        stats = {s.url: s for s in client.stats()}
        assert (stats[pinned.url].state, stats[pinned.url].probes) == ("closed", 2)
        assert ask(key, "Welcome back.") == pinned.url
