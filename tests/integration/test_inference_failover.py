"""Affinity and failover of the pool client across two real llama.cpp servers.

Each server is its own process on its own port (one thread each). One is killed in the middle
of a conversation: the next turn moves to the other server and gets exactly one answer, the
dead one is ejected, probed after the cooldown, and the conversation goes home once it is back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Settings
from inference import Endpoint, GenerationParams, InferenceClient, PoolConfig, local
from tests.support.processes import Proc, free_port

PARAMS = GenerationParams(temperature=0, max_tokens=6, seed=1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Server:
    """One llama.cpp server on a fixed port, so a restart comes back at the same URL."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_dir = log_dir
        self.proc: Proc | None = None

    def start(self) -> None:
        argv = local.server_command(port=self.port, threads=1, n_ctx=1024)
        self.proc = Proc(self.name, argv, os.environ, self._log_dir)
        local.wait_until_ready(self.url, timeout=120, proc=self.proc.popen)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.popen.pid, signal.SIGKILL)
        self.proc.popen.wait()
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture
def servers(services: Settings, tmp_path: Path) -> Iterator[dict[str, Server]]:
    pair = {name: Server(name, tmp_path) for name in ("model-a", "model-b")}
    try:
        for server in pair.values():
            server.start()
        yield pair
    finally:
        for server in pair.values():
            server.stop()


def ask(client: InferenceClient, key: str, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    result = client.chat(messages, params=PARAMS, conversation_key=key, cache_salt="workspace-1")
    assert result.finish_reason in ("stop", "length")
    return result.endpoint


def requests(client: InferenceClient) -> dict[str, int]:
    return {stats.url: stats.requests - stats.errors for stats in client.stats()}


def test_conversations_stick_to_a_server_and_move_when_it_dies(
    servers: dict[str, Server],
) -> None:
    clock = Clock()
    endpoints = [Endpoint(s.url, model=local.MODEL_ALIAS) for s in servers.values()]
    config = PoolConfig(breaker_failures=2, breaker_cooldown=30, health_interval=0)
    with InferenceClient(endpoints, pool=config, clock=clock, timeout=60) as client:
        # one conversation per server, so both servers are really used
        keys: dict[str, str] = {}
        for n in range(50):
            keys.setdefault(client.route(f"conversation-{n}")[0].url, f"conversation-{n}")
            if len(keys) == 2:
                break
        pinned = next(s for s in servers.values() if s.url in keys)
        other = next(s for s in servers.values() if s is not pinned)
        key = keys[pinned.url]

        for turn in range(3):
            for url, conversation in keys.items():
                assert ask(client, conversation, f"Say hello, turn {turn}.") == url
        assert requests(client) == {pinned.url: 3, other.url: 3}

        pinned.kill()
        served_before = requests(client)[other.url]
        # the next turn of the pinned conversation moves and is answered exactly once
        assert ask(client, key, "Are you still there?") == other.url
        stats = {s.url: s for s in client.stats()}
        assert requests(client)[other.url] == served_before + 1
        assert (stats[pinned.url].errors, stats[pinned.url].state) == (1, "closed")

        # a second refused turn opens the breaker: after that the dead server is not tried
        assert ask(client, key, "Hello again.") == other.url
        assert {s.url: s.state for s in client.stats()}[pinned.url] == "open"
        tried = {s.url: s.requests for s in client.stats()}[pinned.url]
        assert ask(client, key, "And again.") == other.url
        assert {s.url: s.requests for s in client.stats()}[pinned.url] == tried

        # after the cooldown a health check probes it; still dead, so it opens again
        clock.now += 30
        healthy = {e.url: ok for e, ok, _ in client.health()}
        stats = {s.url: s for s in client.stats()}
        assert healthy == {pinned.url: False, other.url: True}
        assert (stats[pinned.url].state, stats[pinned.url].probes) == ("open", 1)

        # back on the same port: the next probe closes the breaker and the conversation
        # returns to its own server
        pinned.start()
        clock.now += 30
        client.health()
        stats = {s.url: s for s in client.stats()}
        assert (stats[pinned.url].state, stats[pinned.url].probes) == ("closed", 2)
        assert ask(client, key, "Welcome back.") == pinned.url
