"""``parley chat`` against the in-process app: each simulator payload goes through the real
webhook route, signed with the channel's secret, and is stored."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from bots.policy import Policy
from bots.schemas import BotsFile, BotSpec, ChannelSpec, MetaAppSpec
from bots.service import apply_bots
from core.models import Contact, Message, Reaction
from parley.chat import Chat, find_target, new_user_id, run_chat

CHANNELS = ("whatsapp", "messenger", "instagram")


@dataclass(frozen=True)
class Accounts:
    ids: dict[str, str]
    app_secret: str
    instagram_secret: str


def _id() -> str:
    return str(100000000000000 + secrets.randbelow(10**12))


@pytest.fixture
def accounts(db: Session) -> Accounts:
    ids = {channel: _id() for channel in CHANNELS}
    secret, ig_secret = secrets.token_hex(16), secrets.token_hex(16)
    spec = BotsFile(
        workspace=f"ws-{secrets.token_hex(3)}",
        meta_apps=[
            MetaAppSpec(
                name="app",
                app_id="1234567890123456",
                app_secret=secret,
                verify_token=secrets.token_hex(8),
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
                        phone_number_id=ids["whatsapp"],
                        access_token="t1",
                    ),
                    ChannelSpec(
                        type="messenger", app="app", page_id=ids["messenger"], access_token="t2"
                    ),
                    ChannelSpec(
                        type="instagram",
                        app="app",
                        instagram_account_id=ids["instagram"],
                        access_token="t3",
                    ),
                ],
            )
        ],
    )
    apply_bots(db, spec)
    db.commit()
    return Accounts(ids, secret, ig_secret)


def _chat(client: TestClient, accounts: Accounts, channel: str) -> Chat:
    target = find_target(accounts.ids[channel], channel)
    # TestClient is an httpx.Client that calls the app in-process.
    http = cast(httpx.Client, client)
    return Chat("http://testserver", target, new_user_id(channel), http=http, states=False)


def _message(db: Session, provider_id: str | None) -> Message:
    db.expire_all()
    return db.execute(
        select(Message).where(Message.provider_message_id == provider_id)
    ).scalar_one()


@pytest.mark.parametrize("channel", CHANNELS)
def test_find_target_picks_the_channels_account_and_secret(
    accounts: Accounts, channel: str
) -> None:
    target = find_target(accounts.ids[channel], channel)
    assert (target.channel, target.account) == (channel, accounts.ids[channel])
    expected = accounts.instagram_secret if channel == "instagram" else accounts.app_secret
    assert target.app_secret == expected
    with pytest.raises(LookupError):
        find_target(accounts.ids["whatsapp" if channel != "whatsapp" else "messenger"], channel)


@pytest.mark.parametrize("channel", CHANNELS)
def test_text_image_and_delete_are_stored(
    client: TestClient, db: Session, accounts: Accounts, channel: str, tmp_path: Path
) -> None:
    chat = _chat(client, accounts, channel)
    chat.send("hello there")
    text = _message(db, chat.last_user_mid)
    assert (text.direction, text.kind, text.body) == ("in", "text", "hello there")

    picture = tmp_path / "kettle.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(32))
    chat.send_image(str(picture))
    image = _message(db, chat.last_user_mid)
    assert (image.direction, image.kind) == ("in", "media")
    assert image.body is not None and image.body.startswith("[image]")

    deleted = chat.delete()
    if channel == "messenger":
        assert deleted is False  # Messenger has no unsend: nothing posted
        assert _message(db, image.provider_message_id).kind == "media"
    else:
        assert deleted is True
        assert _message(db, image.provider_message_id).kind == "deleted"


@pytest.mark.parametrize("channel", CHANNELS)
def test_reaction_to_the_bots_last_message_is_stored(
    client: TestClient, db: Session, accounts: Accounts, channel: str
) -> None:
    chat = _chat(client, accounts, channel)
    with pytest.raises(RuntimeError, match="not sent anything to react"):
        chat.react("\U0001f44d")
    chat.last_bot_mid = "m_SANDBOX" + secrets.token_hex(8)
    chat.react("\u2764\ufe0f")
    db.expire_all()
    [reaction] = db.execute(
        select(Reaction).where(Reaction.target_provider_message_id == chat.last_bot_mid)
    ).scalars()
    assert (reaction.emoji, reaction.removed) == ("\u2764\ufe0f", False)
    if channel != "whatsapp":
        assert reaction.reaction == "love"


@pytest.mark.parametrize("channel", CHANNELS)
def test_stop_sends_stop_and_on_whatsapp_a_marketing_stop(
    client: TestClient, db: Session, accounts: Accounts, channel: str
) -> None:
    chat = _chat(client, accounts, channel)
    chat.stop()
    stop = _message(db, chat.last_user_mid)
    assert stop.body == "STOP"
    contact = db.execute(
        select(Contact).where(Contact.channel == channel, Contact.external_id == chat.user)
    ).scalar_one()
    assert (contact.marketing_opted_out_at is not None) == (channel == "whatsapp")


def test_delete_on_messenger_says_there_is_no_unsend(
    client: TestClient, accounts: Accounts
) -> None:
    chat = _chat(client, accounts, "messenger")
    said: list[str] = []
    run_chat(chat, ["/delete", "/nope", "/quit", "never sent"], said.append)
    assert said == [
        "Messenger has no unsend: nothing was sent",
        "unknown command /nope; /help lists them",
    ]
