"""An echo of our own Messenger send settles an ambiguous chunk through its metadata, even when
the bots file does not name the Meta app id; a staff reply from the Page inbox takes over."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from bots.schemas import BotsFile, BotSpec, ChannelSpec, MetaAppSpec
from bots.service import apply_bots
from core.models import Conversation, Message, OutboundChunk
from webhooks.channels.meta import sign
from webhooks.simulator import encode

PAGE, USER = "555000111222", "7000000000001"


def _post(client: TestClient, payload: dict[str, object], secret: str) -> None:
    body = encode(payload)
    r = client.post(
        "/webhooks/messenger", content=body, headers={"X-Hub-Signature-256": sign(body, secret)}
    )
    assert r.status_code == 200, r.text


def _event(message: dict[str, object], *, from_page: bool) -> dict[str, object]:
    ms = int(time.time() * 1000)
    sender, recipient = (PAGE, USER) if from_page else (USER, PAGE)
    return {
        "object": "page",
        "entry": [
            {
                "id": PAGE,
                "time": ms,
                "messaging": [
                    {
                        "sender": {"id": sender},
                        "recipient": {"id": recipient},
                        "timestamp": ms,
                        "message": message,
                    }
                ],
            }
        ],
    }


def test_echo_metadata_settles_our_send_and_staff_echo_takes_over(
    client: TestClient, db: Session
) -> None:
    secret = "messenger-secret"
    apply_bots(
        db,
        BotsFile(
            workspace="m",
            meta_apps=[MetaAppSpec(name="app", app_secret=secret, verify_token="v")],
            bots=[
                BotSpec(
                    name="b",
                    system_prompt="p",
                    channels=[
                        ChannelSpec(type="messenger", app="app", page_id=PAGE, access_token="t")
                    ],
                )
            ],
        ),
    )
    db.commit()
    _post(client, _event({"mid": "m_in_1", "text": "hello"}, from_page=False), secret)
    conversation = db.execute(select(Conversation)).scalar_one()
    reply = Message(
        workspace_id=conversation.workspace_id,
        conversation_id=conversation.id,
        direction="out",
        channel="messenger",
        kind="text",
        body="hi there",
        status="sending",
        attempts=1,
    )
    db.add(reply)
    db.flush()
    chunk = OutboundChunk(
        workspace_id=conversation.workspace_id,
        conversation_id=conversation.id,
        message_id=reply.id,
        channel="messenger",
        idx=0,
        total=1,
        body="hi there",
        idempotency_key=f"{reply.id}:0",
        state="unknown",
        attempts=1,
    )
    db.add(chunk)
    db.commit()

    # Our own send, echoed with its metadata but no app id we know of.
    _post(
        client,
        _event(
            {"mid": "m_out_1", "is_echo": True, "text": "hi there", "metadata": f"{reply.id}:0"},
            from_page=True,
        ),
        secret,
    )
    db.expire_all()
    assert db.get(OutboundChunk, chunk.id).state == "sent"  # type: ignore[union-attr]
    assert db.get(Conversation, conversation.id).mode == "bot"  # type: ignore[union-attr]

    # A person answering from the Page inbox: no metadata of ours.
    _post(
        client,
        _event({"mid": "m_out_2", "is_echo": True, "text": "Hi, Ana here"}, from_page=True),
        secret,
    )
    db.expire_all()
    assert db.get(Conversation, conversation.id).mode == "human"  # type: ignore[union-attr]
    human = db.execute(select(Message).where(Message.kind == "human")).scalar_one()
    assert human.body == "Hi, Ana here"


def test_the_sandbox_signs_instagram_webhooks_with_the_instagram_secret(db: Session) -> None:
    from webhooks import repository

    apply_bots(
        db,
        BotsFile(
            workspace="ig",
            meta_apps=[
                MetaAppSpec(
                    name="app",
                    app_secret="fb-secret",
                    verify_token="v",
                    instagram_app_secret="ig-secret",
                )
            ],
            bots=[
                BotSpec(
                    name="b",
                    system_prompt="p",
                    channels=[
                        ChannelSpec(
                            type="instagram",
                            app="app",
                            instagram_account_id="1784001",
                            access_token="t",
                        ),
                        ChannelSpec(
                            type="messenger", app="app", page_id="1784002", access_token="t"
                        ),
                    ],
                )
            ],
        ),
    )
    db.flush()
    assert repository.app_secret_for_account(db, "instagram", "1784001") == "ig-secret"
    assert repository.app_secret_for_account(db, "messenger", "1784002") == "fb-secret"
    assert repository.app_secret_for_account(db, "instagram", "nobody") is None
