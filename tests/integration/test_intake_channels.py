"""Intake of every recorded payload of the three channels: the rows each one stores."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bots import repository as bots_repository
from bots.policy import Policy
from bots.schemas import BotsFile, BotSpec, ChannelSpec, MetaAppSpec
from bots.service import apply_bots
from core.models import (
    Contact,
    Conversation,
    Message,
    OptIn,
    OutboxJob,
    Outcome,
    Reaction,
    Template,
    UnhandledEvent,
)
from webhooks import repository, simulator

PAYLOADS = Path(__file__).parent.parent / "payloads"
OUR_APP_ID = "1234567890123456"
# The accounts the recorded payloads address; the "…1" ones become the test bot's.
RECORDED = {
    "whatsapp": "109876543210001",
    "messenger": "104857600000001",
    "instagram": "17841400000000001",
}


@dataclass(frozen=True)
class ChannelsBot:
    accounts: dict[str, str]
    app_secret: str
    instagram_secret: str
    verify_tokens: dict[str, str]


def _id() -> str:
    return str(100000000000000 + secrets.randbelow(10**12))


@pytest.fixture
def bot(db: Session) -> ChannelsBot:
    accounts = {channel: _id() for channel in RECORDED}
    secret, ig_secret = secrets.token_hex(16), secrets.token_hex(16)
    tokens = {c: secrets.token_hex(8) for c in RECORDED}
    spec = BotsFile(
        workspace=f"ws-{secrets.token_hex(3)}",
        meta_apps=[
            MetaAppSpec(
                name="app",
                app_id=OUR_APP_ID,
                app_secret=secret,
                verify_token=tokens["whatsapp"],
                messenger_verify_token=tokens["messenger"],
                instagram_verify_token=tokens["instagram"],
                instagram_app_secret=ig_secret,
            )
        ],
        bots=[
            BotSpec(
                name="bot",
                system_prompt="You help.",
                policy=Policy(burst_window_seconds=0),
                channels=[
                    ChannelSpec(
                        type="whatsapp",
                        app="app",
                        phone_number_id=accounts["whatsapp"],
                        access_token="t1",
                    ),
                    ChannelSpec(
                        type="messenger",
                        app="app",
                        page_id=accounts["messenger"],
                        access_token="t2",
                    ),
                    ChannelSpec(
                        type="instagram",
                        app="app",
                        instagram_account_id=accounts["instagram"],
                        access_token="t3",
                    ),
                ],
            )
        ],
    )
    apply_bots(db, spec)
    db.commit()
    ws = bots_repository.workspace_by_name(db, spec.workspace)
    assert ws is not None
    return ChannelsBot(accounts, secret, ig_secret, tokens)


def _payload(bot: ChannelsBot, channel: str, name: str) -> bytes:
    raw = (PAYLOADS / channel / f"{name}.json").read_text()
    return simulator.encode(json.loads(raw.replace(RECORDED[channel], bot.accounts[channel])))


def _post(client: TestClient, bot: ChannelsBot, channel: str, body: bytes) -> Any:
    secret = bot.instagram_secret if channel == "instagram" else bot.app_secret
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": _sign(body, secret)}
    return client.post(f"/webhooks/{channel}", content=body, headers=headers)


def _sign(body: bytes, secret: str) -> str:
    from webhooks.channels.meta import sign

    return sign(body, secret)


def snapshot(db: Session) -> dict[str, Any]:
    """Every row intake writes, in a stable, comparable form."""
    db.expire_all()
    messages = db.execute(
        select(
            Message.direction,
            Message.kind,
            Message.provider_message_id,
            Message.body,
            Message.body_redacted,
            Message.status,
            Message.id,
        ).order_by(Message.id)
    ).all()
    ids = {r.id: r.provider_message_id for r in messages}
    outcomes = db.execute(select(Outcome.inbound_id, Outcome.kind, Outcome.detail)).all()
    jobs = db.execute(select(OutboxJob.task, OutboxJob.payload)).all()
    return {
        "messages": sorted(
            (
                r.direction,
                r.kind,
                r.provider_message_id[-6:] if r.provider_message_id else None,
                r.body,
                r.status,
            )
            for r in messages
        ),
        "outcomes": sorted((ids[r.inbound_id][-6:], r.kind, r.detail) for r in outcomes),
        "jobs": sorted((name, ids[p["message_id"]][-6:]) for name, p in jobs),
        "modes": sorted(
            ((m, f) for m, f in db.execute(select(Conversation.mode, Conversation.flagged)).all()),
            key=lambda mf: (mf[0], mf[1] or ""),
        ),
        "unhandled": sorted(db.execute(select(UnhandledEvent.reason)).scalars()),
        "reactions": sorted(
            (r.target_provider_message_id[-6:], r.emoji, r.reaction, r.removed)
            for r in db.execute(select(Reaction)).scalars()
        ),
        "templates": sorted(
            (t.name, t.language, t.status, t.reason) for t in db.execute(select(Template)).scalars()
        ),
        "optins": sorted(
            (o.topic, o.token is not None, o.notification_status)
            for o in db.execute(select(OptIn)).scalars()
        ),
        "opted_out": sorted(
            (c.opted_out_at is not None, c.marketing_opted_out_at is not None)
            for c in db.execute(select(Contact)).scalars()
        ),
    }


CASES = [
    (channel, path.stem)
    for channel in ("whatsapp", "messenger", "instagram")
    for path in sorted((PAYLOADS / channel).glob("*.json"))
]


EXPECTED: dict[str, Any] = json.loads((Path(__file__).parent / "intake_expected.json").read_text())


def _comparable(snap: dict[str, Any]) -> dict[str, Any]:
    # Unhandled events carry no id to dedupe on: a redelivery records them again.
    return {
        **json.loads(json.dumps(snap, default=str)),
        "unhandled": sorted(set(snap["unhandled"])),
    }


@pytest.mark.parametrize(("channel", "name"), CASES)
def test_recorded_payload_stores_exactly_its_rows_once(
    client: TestClient, db: Session, bot: ChannelsBot, channel: str, name: str
) -> None:
    body = _payload(bot, channel, name)
    assert _post(client, bot, channel, body).status_code == 200
    first = _comparable(snapshot(db))
    assert first == EXPECTED[f"{channel}-{name}"]
    assert _post(client, bot, channel, body).status_code == 200
    assert _comparable(snapshot(db)) == first


def _text(bot: ChannelsBot, channel: str, mid: str, text: str = "hello") -> bytes:
    if channel == "whatsapp":
        payload = simulator.whatsapp_text(
            phone_number_id=bot.accounts["whatsapp"], wa_id="15551230000", text=text, message_id=mid
        )
    else:
        payload = {
            "object": "page" if channel == "messenger" else "instagram",
            "entry": [
                {
                    "id": bot.accounts[channel],
                    "time": 1772442900500,
                    "messaging": [
                        {
                            "sender": {"id": "6283019475561234"},
                            "recipient": {"id": bot.accounts[channel]},
                            "timestamp": 1772442900000,
                            "message": {"mid": mid, "text": text},
                        }
                    ],
                }
            ],
        }
    return simulator.encode(payload)


@pytest.mark.parametrize(
    ("channel", "name"),
    [
        ("whatsapp", "edit"),
        ("messenger", "message_edit"),
        ("whatsapp", "revoke"),
        ("instagram", "unsend"),
    ],
)
def test_edits_and_deletes_change_the_stored_message(
    client: TestClient, db: Session, bot: ChannelsBot, channel: str, name: str
) -> None:
    raw = json.loads(_payload(bot, channel, name))
    target, sender = _target_of(raw)
    body = _text(bot, channel, target)
    if channel == "whatsapp":
        body = body.replace(b"15551230000", sender.encode())
    else:
        body = body.replace(b"6283019475561234", sender.encode())
    assert _post(client, bot, channel, body).status_code == 200
    db.expire_all()
    message = db.execute(select(Message).where(Message.provider_message_id == target)).scalar_one()
    db.execute(update(Message).where(Message.id == message.id).values(body_redacted="hello"))
    db.commit()
    assert _post(client, bot, channel, _payload(bot, channel, name)).status_code == 200
    db.expire_all()
    stored = db.get(Message, message.id)
    assert stored is not None
    message = stored
    outcome = db.get(Outcome, message.id)
    if name in ("edit", "message_edit"):
        assert message.kind == "text"
        assert message.body not in (None, "hello")
        assert message.body_redacted is None
        assert outcome is None  # still pending: the pipeline answers the edited text
    else:
        assert (message.kind, message.body, message.body_redacted, message.content) == (
            "deleted",
            None,
            None,
            None,
        )
        assert outcome is not None and outcome.kind == "deleted"
        assert message.status == "deleted"


def _target_of(raw: dict[str, Any]) -> tuple[str, str]:
    """(the original message id, the sender) of the first edit/delete in a recorded payload."""
    for entry in raw["entry"]:
        for change in entry.get("changes", []):
            for m in change["value"].get("messages", []):
                if m.get("type") == "edit":
                    return m["edit"]["original_message_id"], m["from"]
                if m.get("type") == "revoke":
                    return m["revoke"]["original_message_id"], m["from"]
        for event in entry.get("messaging", []):
            if "message_edit" in event:
                return event["message_edit"]["mid"], event["sender"]["id"]
            if event.get("message", {}).get("is_deleted"):
                return event["message"]["mid"], event["sender"]["id"]
    raise AssertionError("no edit or delete in the payload")


def test_one_failing_event_rolls_back_the_whole_delivery_and_the_retry_stores_it_once(
    client: TestClient, db: Session, bot: ChannelsBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _payload(bot, "messenger", "batch")
    real = repository.upsert_reaction
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        real(*args, **kwargs)

    monkeypatch.setattr(repository, "upsert_reaction", flaky)
    assert _post(client, bot, "messenger", body).status_code == 500
    empty = snapshot(db)
    assert empty["messages"] == [] and empty["jobs"] == [] and empty["unhandled"] == []
    assert _post(client, bot, "messenger", body).status_code == 200
    assert _post(client, bot, "messenger", body).status_code == 200
    assert _comparable(snapshot(db)) == EXPECTED["messenger-batch"]


@pytest.mark.parametrize("channel", ["whatsapp", "messenger", "instagram"])
def test_handshake_uses_the_channels_own_token(
    client: TestClient, bot: ChannelsBot, channel: str
) -> None:
    for other, token in bot.verify_tokens.items():
        r = client.get(
            f"/webhooks/{channel}",
            params={"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "42"},
        )
        assert (r.status_code, r.text if r.status_code == 200 else "") == (
            (200, "42") if other == channel else (403, "")
        )
    r = client.get(
        f"/webhooks/{channel}",
        params={"hub.mode": "subscribe", "hub.verify_token": bot.verify_tokens[channel]},
    )
    assert r.status_code == 400


@pytest.mark.parametrize("channel", ["whatsapp", "messenger", "instagram"])
def test_signature_per_channel(
    client: TestClient, db: Session, bot: ChannelsBot, channel: str
) -> None:
    body = _text(bot, channel, f"mid.{secrets.token_hex(8)}")
    wrong = bot.app_secret if channel == "instagram" else bot.instagram_secret
    headers = {"Content-Type": "application/json"}
    assert client.post(f"/webhooks/{channel}", content=body, headers=headers).status_code == 401
    sha1 = {**headers, "X-Hub-Signature": "sha1=" + "0" * 40}
    assert client.post(f"/webhooks/{channel}", content=body, headers=sha1).status_code == 401
    bad = {**headers, "X-Hub-Signature-256": _sign(body, wrong)}
    assert client.post(f"/webhooks/{channel}", content=body, headers=bad).status_code == 403
    assert snapshot(db)["messages"] == []
    assert _post(client, bot, channel, body).status_code == 200
    assert len(snapshot(db)["messages"]) == 1


@pytest.mark.parametrize("channel", ["messenger", "instagram"])
def test_oversized_body_is_413(client: TestClient, bot: ChannelsBot, channel: str) -> None:
    body = b"{" + b" " * (4 * 1024 * 1024) + b"}"
    assert _post(client, bot, channel, body).status_code == 413
