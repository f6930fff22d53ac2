"""End-to-end fixtures: a fresh database per module, the real local model, real processes."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from core.db import session_scope
from tests.support import databases
from tests.support.factories import WhatsAppBot, create_whatsapp_bot
from tests.support.processes import Proc, parley, wait_http
from webhooks import simulator

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def e2e_db(template_db: str) -> Iterator[str]:
    name = databases.create_database("parley_e2e", template=template_db)
    yield databases.url_for(name)
    databases.drop_database(name)


@dataclass
class Platform:
    api: str
    env: dict[str, str]
    log_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def start(self, name: str, args: list[str]) -> Proc:
        self.procs[name] = parley(name, args, self.env, self.log_dir)
        return self.procs[name]

    def stop(self, name: str) -> None:
        self.procs.pop(name).stop()

    def post(self, payload: Any, secret: str) -> httpx.Response:
        body, headers = simulator.signed(payload, secret)
        return self.http.post(f"{self.api}/webhooks/whatsapp", content=body, headers=headers)

    def sends(self, to: str) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.api}/sandbox/sent", params={"to": to})
        r.raise_for_status()
        messages: list[dict[str, Any]] = r.json()["messages"]
        return messages

    def wait_sends(self, to: str, count: int, timeout: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.sends(to)
            if len(got) >= count:
                return got
            for proc in self.procs.values():
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} died:\n{proc.output()[-3000:]}")
            time.sleep(0.25)
        tails = "\n".join(f"--- {p.name}\n{p.output()[-2500:]}" for p in self.procs.values())
        raise TimeoutError(
            f"{count} sends to {to} not seen in {timeout}s: {self.sends(to)}\n{tails}"
        )

    def logs(self) -> str:
        return "\n".join(p.output() for p in self.procs.values())

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.http.close()


def platform_env(db_url: str, model_url: str, api_port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=db_url,
        # Under the session's prefix, so the session's clean-up removes these keys too.
        PARLEY_REDIS_PREFIX=f"{os.environ['PARLEY_REDIS_PREFIX']}e2e-{secrets.token_hex(4)}:",
        PARLEY_INFERENCE_ENDPOINTS=f"{model_url}#model=smollm2",
        PARLEY_API_PORT=str(api_port),
        PARLEY_GRAPH_API_URL=f"http://127.0.0.1:{api_port}/sandbox/graph",
        PARLEY_OUTBOX_RELAY_INTERVAL="1",
        PARLEY_OUTBOX_RELAY_AFTER="2",
        PARLEY_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def start_platform(env: dict[str, str], log_dir: Path, *, beat: bool = False) -> Platform:
    api = f"http://127.0.0.1:{env['PARLEY_API_PORT']}"
    platform = Platform(api=api, env=env, log_dir=log_dir)
    proc = platform.start("api", ["api"])
    wait_http(f"{api}/readyz", timeout=60, proc=proc)
    platform.start(
        "worker",
        [
            "worker",
            "--queues",
            "conversations,send,maintenance",
            "--pool",
            "threads",
            "--concurrency",
            "4",
        ],
    )
    if beat:
        platform.start("beat", ["beat"])
    return platform


def make_bot(db_url: str, **kwargs: Any) -> WhatsAppBot:
    engine = create_engine(db_url)
    try:
        with session_scope(sessionmaker(bind=engine, expire_on_commit=False)) as session:
            return create_whatsapp_bot(session, **kwargs)
    finally:
        engine.dispose()
