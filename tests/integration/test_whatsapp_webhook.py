"""POST/GET /webhooks/whatsapp against real Postgres and Redis, in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.config import get_settings
from core.models import Message, OutboxJob, UnhandledEvent
from tests.support.factories import WhatsAppBot, create_whatsapp_bot
from webhooks import simulator
from webhooks.channels.meta import sign


def _count(db: Session, model: type) -> int:
    db.expire_all()
    return db.execute(select(func.count()).select_from(model)).scalar_one()


def _post(client: TestClient, body: bytes, headers: dict[str, str]) -> int:
    return client.post("/webhooks/whatsapp", content=body, headers=headers).status_code


def _text(bot: WhatsAppBot, text: str = "hello") -> dict[str, Any]:
    return simulator.whatsapp_text(
        phone_number_id=bot.phone_number_id, wa_id="15551230000", text=text
    )


# --- verification handshake -------------------------------------------------------------------


def test_handshake_echoes_challenge_as_plain_text(client: TestClient, wa_bot: WhatsAppBot) -> None:
    r = client.get(
        "/webhooks/whatsapp",
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": wa_bot.verify_token,
            "hub.challenge": "<script>1</script>",
        },
    )
    assert r.status_code == 200
    assert r.text == "<script>1</script>"
    assert r.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("mode", "token_ok", "challenge", "status"),
    [
        ("subscribe", False, "123", 403),
        ("unsubscribe", True, "123", 403),
        (None, True, "123", 403),
        ("subscribe", True, None, 400),
    ],
)
def test_handshake_refusals(
    client: TestClient,
    wa_bot: WhatsAppBot,
    mode: str | None,
    token_ok: bool,
    challenge: str | None,
    status: int,
) -> None:
    params = {"hub.verify_token": wa_bot.verify_token if token_ok else "wrong"}
    if mode:
        params["hub.mode"] = mode
    if challenge:
        params["hub.challenge"] = challenge
    r = client.get("/webhooks/whatsapp", params=params)
    assert r.status_code == status
    assert r.json()["detail"]


# --- signatures -------------------------------------------------------------------------------


def test_valid_signature_stores_message_and_outbox_job(
    client: TestClient, db: Session, wa_bot: WhatsAppBot, redis_client: redis.Redis
) -> None:
    body, headers = simulator.signed(_text(wa_bot), wa_bot.app_secret)
    queue = f"{get_settings().redis_prefix}conversations"
    before = redis_client.llen(queue)
    assert _post(client, body, headers) == 200
    assert _count(db, Message) == 1
    job = db.execute(select(OutboxJob)).scalar_one()
    assert job.task == "bots.reply" and job.state == "pending"
    message = db.execute(select(Message)).scalar_one()
    assert job.payload == {"message_id": message.id}
    assert message.body == "hello" and message.direction == "in"
    # The doorbell rang after commit: one task is waiting in the lane's Redis list.
    assert redis_client.llen(queue) == before + 1


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("", 401),
        ("sha1=" + "0" * 40, 401),
        ("sha256=nothex", 401),
        ("sha256=" + "0" * 64, 403),
    ],
)
def test_bad_signatures_store_nothing(
    client: TestClient, db: Session, wa_bot: WhatsAppBot, header: str | None, status: int
) -> None:
    body = simulator.encode(_text(wa_bot))
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["X-Hub-Signature-256"] = header
    assert _post(client, body, headers) == status
    assert _count(db, Message) == 0
    assert _count(db, OutboxJob) == 0


def test_signature_of_another_secret_is_refused(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    body, headers = simulator.signed(_text(wa_bot), "not-the-secret")
    assert _post(client, body, headers) == 403
    assert _count(db, Message) == 0


def test_signature_is_over_raw_bytes_with_unicode_escapes(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    body, headers = simulator.signed(_text(wa_bot, text="caf\u00e9 \U0001f600"), wa_bot.app_secret)
    assert b"\\u00e9" in body  # Meta escapes non-ASCII before signing
    assert _post(client, body, headers) == 200
    db.expire_all()
    assert db.execute(select(Message.body)).scalar_one() == "caf\u00e9 \U0001f600"
    # The same JSON re-serialized with raw UTF-8 is different bytes: the old signature fails.
    reencoded = json.dumps(json.loads(body), ensure_ascii=False).encode()
    assert _post(client, reencoded, headers) == 403


# --- duplicates -------------------------------------------------------------------------------


def test_same_delivery_twice_stores_one_message(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    body, headers = simulator.signed(_text(wa_bot), wa_bot.app_secret)
    assert _post(client, body, headers) == 200
    r = client.post("/webhooks/whatsapp", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["duplicates"] == 1
    assert _count(db, Message) == 1
    assert _count(db, OutboxJob) == 1


# --- bad input --------------------------------------------------------------------------------


def test_non_json_with_valid_signature_is_400(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    body = b"this is { not json"
    r = client.post(
        "/webhooks/whatsapp",
        content=body,
        headers={"X-Hub-Signature-256": sign(body, wa_bot.app_secret)},
    )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_json"
    assert _count(db, Message) == 0
    assert _count(db, UnhandledEvent) == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"hello": "world"},
        [1, 2, 3],
        {"object": "whatsapp_business_account", "entry": "nope"},
        {
            "object": "whatsapp_business_account",
            "entry": [{"changes": [{"field": "account_update", "value": {}}]}],
        },
    ],
)
def test_unknown_shapes_are_acknowledged_and_recorded(
    client: TestClient, db: Session, wa_bot: WhatsAppBot, payload: object
) -> None:
    body, headers = simulator.signed(payload, wa_bot.app_secret)
    assert _post(client, body, headers) == 200
    assert _count(db, UnhandledEvent) == 1
    assert _count(db, Message) == 0


def test_unknown_account_with_valid_signature_is_unroutable(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    payload = simulator.whatsapp_text(phone_number_id="999", wa_id="15550001111", text="hi")
    body, headers = simulator.signed(payload, wa_bot.app_secret)
    r = client.post("/webhooks/whatsapp", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["unroutable"] == 1
    assert _count(db, Message) == 0
    reason = db.execute(select(UnhandledEvent.reason)).scalar_one()
    assert reason == "unroutable"


def test_account_of_another_app_is_not_routed_by_this_signature(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    other = create_whatsapp_bot(db)
    db.commit()
    # Signed by wa_bot's app but addressed to the other app's number.
    payload = simulator.whatsapp_text(phone_number_id=other.phone_number_id, wa_id="1", text="x")
    body, headers = simulator.signed(payload, wa_bot.app_secret)
    assert (
        client.post("/webhooks/whatsapp", content=body, headers=headers).json()["unroutable"] == 1
    )
    assert _count(db, Message) == 0


def test_oversized_body_is_413_without_reading_it(client: TestClient, wa_bot: WhatsAppBot) -> None:
    big = b"x" * (4 * 1024 * 1024 + 1)
    r = client.post(
        "/webhooks/whatsapp",
        content=big,
        headers={"X-Hub-Signature-256": sign(big, wa_bot.app_secret)},
    )
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: a chunked upload
        for _ in range(5):
            yield b"y" * (1024 * 1024)

    r = client.post(
        "/webhooks/whatsapp",
        content=chunks(),
        headers={"X-Hub-Signature-256": "sha256=" + "0" * 64},
    )
    assert r.status_code == 413


def test_batch_of_entries_and_messages_is_stored_together(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    first = _text(wa_bot, text="one")
    second = _text(wa_bot, text="two")
    first["entry"].append(second["entry"][0])
    first["entry"][0]["changes"][0]["value"]["messages"].append(
        {
            "from": "15551230000",
            "id": simulator.new_wamid(),
            "timestamp": "1700000000",
            "type": "text",
            "text": {"body": "three"},
        }
    )
    body, headers = simulator.signed(first, wa_bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).json()["stored"] == 3
    db.expire_all()
    assert sorted(str(b) for b in db.execute(select(Message.body)).scalars()) == [
        "one",
        "three",
        "two",
    ]
