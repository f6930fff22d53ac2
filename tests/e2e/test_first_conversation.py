"""The spine, end to end: signed webhook → Postgres → Celery → screen → real model → screen →
Graph API (sandbox), with real API and worker processes and the real local model."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Platform, make_bot, platform_env, start_platform
from tests.support.factories import WhatsAppBot
from tests.support.processes import RecordingProxy, free_port
from webhooks import simulator

pytestmark = pytest.mark.e2e

PHONE = "+44 20 7946 0958"
PHONE_DIGITS = "2079460958"


@pytest.fixture(scope="module")
def proxy(model_server: str) -> Iterator[RecordingProxy]:
    p = RecordingProxy(model_server)
    yield p
    p.close()


@pytest.fixture(scope="module")
def platform(
    e2e_db: str, proxy: RecordingProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    env = platform_env(e2e_db, proxy.url, free_port())
    p = start_platform(env, tmp_path_factory.mktemp("logs"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def bot(e2e_db: str) -> WhatsAppBot:
    return make_bot(e2e_db)


def test_a_signed_message_gets_exactly_one_reply_and_memory_carries_the_turn(
    platform: Platform, bot: WhatsAppBot, proxy: RecordingProxy
) -> None:
    user = "15557770001"
    first = simulator.whatsapp_text(
        phone_number_id=bot.phone_number_id, wa_id=user, text="Hi! Do you sell sourdough bread?"
    )
    assert platform.post(first, bot.app_secret).status_code == 200
    sends = platform.wait_sends(user, 2)
    assert len(sends) == 2
    assert all(s["to"] == user and s["account"] == bot.phone_number_id for s in sends)
    # The first reply of a conversation is preceded by the AI disclosure notice.
    assert sends[0]["text"] == "Hi! You're chatting with an automated assistant."
    assert sends[1]["text"].strip()
    first_reply = sends[1]["text"]

    second = simulator.whatsapp_text(
        phone_number_id=bot.phone_number_id,
        wa_id=user,
        text=f"Great. Please call me back on {PHONE} about an order.",
    )
    assert platform.post(second, bot.app_secret).status_code == 200
    sends = platform.wait_sends(user, 3)
    assert len(sends) == 3 and sends[2]["text"].strip()

    prompts = [r["messages"] for r in proxy.chat_requests()]
    last = prompts[-1]
    contents = "\n".join(m["content"] for m in last)
    # The second prompt carries the first turn: the user's message and the bot's reply to it.
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]
    assert last[1]["content"] == "Hi! Do you sell sourdough bread?"
    assert last[2]["content"] == first_reply
    # The planted phone number never reached the model, nor any process log.
    assert "<PHONE>" in last[3]["content"]
    for text in (contents, platform.logs()):
        assert PHONE not in text
        assert PHONE_DIGITS not in re.sub(r"\D", "", text)


def test_the_same_delivery_posted_concurrently_is_answered_once(
    platform: Platform, bot: WhatsAppBot
) -> None:
    user = "15557770002"
    payload = simulator.whatsapp_text(
        phone_number_id=bot.phone_number_id, wa_id=user, text="What are your opening hours?"
    )
    statuses: list[int] = []

    def post() -> None:
        statuses.append(platform.post(payload, bot.app_secret).status_code)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 6
    assert platform.post(payload, bot.app_secret).status_code == 200  # and once more, later
    platform.wait_sends(user, 2)  # the disclosure notice and the one reply
    # Give a would-be duplicate every chance to show up before concluding there is none.
    time.sleep(3)
    assert len(platform.sends(user)) == 2


def test_chat_command_talks_to_the_bot(
    platform: Platform, bot: WhatsAppBot, tmp_path: Path
) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "parley",
            "chat",
            "--api",
            platform.api,
            "--account",
            bot.phone_number_id,
            "--from",
            "15557770003",
            "-m",
            "Hello there",
        ],
        env=platform.env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(re.findall(r"^bot> \S", out.stdout, re.M)) == 2, out.stdout  # notice + reply
