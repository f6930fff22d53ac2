"""The simulator's payloads: the shape of Meta's recorded payload of the same kind, the bytes
Meta signs, and the events the channel parsers make of them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from webhooks import simulator
from webhooks.channels import instagram, messenger, whatsapp
from webhooks.channels.events import (
    ChannelEvent,
    InboundMedia,
    InboundText,
    MarketingPreference,
    Media,
    MessageDeleted,
    Reaction,
)
from webhooks.channels.meta import sign

PAYLOADS = Path(__file__).parents[1] / "payloads"
PHONE, WA_ID = "109876543210001", "4915112345678"
PAGE, USER = "104857600000001", "6283019475561234"
T = 1772442905
T_MS = 1772442900001
AT = datetime.fromtimestamp(T, UTC)
AT_MS = datetime.fromtimestamp(T_MS / 1000, UTC)
HEART = "\u2764\ufe0f"


def shape(value: Any) -> Any:
    """A payload's structure: its keys, nesting and value types (a list by its first item)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def recorded(channel: str, name: str) -> Any:
    return json.loads((PAYLOADS / channel / f"{name}.json").read_text())


def _wa(**kw: Any) -> dict[str, Any]:
    return {"phone_number_id": PHONE, "wa_id": WA_ID, "timestamp": T, **kw}


def _page(channel: str, **kw: Any) -> dict[str, Any]:
    return {"channel": channel, "account": PAGE, "user": USER, "timestamp_ms": T_MS, **kw}


# (recorded payload, built payload of the same kind, the events the parser must make of it)
WA_CASES: list[tuple[str, dict[str, Any], list[ChannelEvent]]] = [
    (
        "text",
        simulator.whatsapp_text(
            **_wa(text="hi", message_id="wamid.A", context={"from": "15550000000", "id": "w.B"})
        ),
        [InboundText("whatsapp", PHONE, WA_ID, "Test User", "wamid.A", AT, "hi", reply_to="w.B")],
    ),
    (
        "image",
        simulator.whatsapp_image(
            **_wa(media_id="1183456789012345", sha256="c2hh", caption="blue", message_id="wamid.A")
        ),
        [
            InboundMedia(
                channel="whatsapp",
                account_id=PHONE,
                contact_id=WA_ID,
                message_id="wamid.A",
                timestamp=AT,
                media=(
                    Media(
                        kind="image",
                        media_id="1183456789012345",
                        mime_type="image/jpeg",
                        sha256="c2hh",
                    ),
                ),
                caption="blue",
                contact_name="Test User",
            )
        ],
    ),
    (
        "reaction",
        simulator.whatsapp_reaction(
            **_wa(target_message_id="wamid.B", emoji="\U0001f44d", message_id="wamid.A")
        ),
        [
            Reaction(
                channel="whatsapp",
                account_id=PHONE,
                contact_id=WA_ID,
                target_message_id="wamid.B",
                timestamp=AT,
                emoji="\U0001f44d",
                removed=False,
                message_id="wamid.A",
            )
        ],
    ),
    (
        "unreaction",
        simulator.whatsapp_reaction(**_wa(target_message_id="wamid.B", emoji="", message_id="A")),
        [
            Reaction(
                channel="whatsapp",
                account_id=PHONE,
                contact_id=WA_ID,
                target_message_id="wamid.B",
                timestamp=AT,
                emoji=None,
                removed=True,
                message_id="A",
            )
        ],
    ),
    (
        "revoke",
        simulator.whatsapp_revoke(**_wa(original_message_id="wamid.B", message_id="wamid.A")),
        [
            MessageDeleted(
                channel="whatsapp",
                account_id=PHONE,
                contact_id=WA_ID,
                original_message_id="wamid.B",
                timestamp=AT,
                message_id="wamid.A",
            )
        ],
    ),
    (
        "user_preferences",
        simulator.whatsapp_user_preferences(**_wa()),
        [
            MarketingPreference(
                channel="whatsapp",
                account_id=PHONE,
                contact_id=WA_ID,
                timestamp=AT,
                value="stop",
                category="marketing_messages",
                detail="User requested to stop marketing messages",
            )
        ],
    ),
]


@pytest.mark.parametrize(("name", "built", "events"), WA_CASES, ids=[c[0] for c in WA_CASES])
def test_whatsapp_payload_matches_the_recorded_shape_and_parses(
    name: str, built: dict[str, Any], events: list[ChannelEvent]
) -> None:
    assert shape(built) == shape(recorded("whatsapp", name))
    assert whatsapp.parse_events(built) == events


def _page_cases(channel: str) -> list[tuple[str, str, dict[str, Any], list[ChannelEvent]]]:
    text_kw = {"reply_to": "m_0"}  # the recorded text replies to an earlier message
    attachment_kw = {"text": "Here are the photos"} if channel == "messenger" else {}
    cases: list[tuple[str, str, dict[str, Any], list[ChannelEvent]]] = [
        (
            channel,
            "text",
            simulator.page_text(**_page(channel, text="hi", mid="m_1", **text_kw)),
            [InboundText(channel, PAGE, USER, None, "m_1", AT_MS, "hi", reply_to="m_0")],
        ),
        (
            channel,
            "attachments",
            simulator.page_attachment(
                **_page(channel, url="https://cdn.example/a.jpg", mid="m_2", **attachment_kw)
            ),
            [
                InboundMedia(
                    channel=channel,
                    account_id=PAGE,
                    contact_id=USER,
                    message_id="m_2",
                    timestamp=AT_MS,
                    media=(Media(kind="image", url="https://cdn.example/a.jpg"),),
                    caption=attachment_kw.get("text"),
                )
            ],
        ),
        (
            channel,
            "reaction",
            simulator.page_reaction(**_page(channel, target_mid="m_9", emoji=HEART)),
            [
                Reaction(
                    channel=channel,
                    account_id=PAGE,
                    contact_id=USER,
                    target_message_id="m_9",
                    timestamp=AT_MS,
                    emoji=HEART,
                    removed=False,
                    reaction="love",
                )
            ],
        ),
    ]
    if channel == "instagram":
        cases.append(
            (
                channel,
                "unsend",
                simulator.page_delete(**_page(channel, mid="m_1")),
                [
                    MessageDeleted(
                        channel=channel,
                        account_id=PAGE,
                        contact_id=USER,
                        original_message_id="m_1",
                        timestamp=AT_MS,
                    )
                ],
            )
        )
    return cases


PAGE_CASES = _page_cases("messenger") + _page_cases("instagram")


@pytest.mark.parametrize(
    ("channel", "name", "built", "events"), PAGE_CASES, ids=[f"{c[0]}-{c[1]}" for c in PAGE_CASES]
)
def test_page_payload_matches_the_recorded_shape_and_parses(
    channel: str, name: str, built: dict[str, Any], events: list[ChannelEvent]
) -> None:
    assert shape(built) == shape(recorded(channel, name))
    parse = messenger.parse if channel == "messenger" else instagram.parse
    assert parse(built) == events


@pytest.mark.parametrize("channel", ["messenger", "instagram"])
def test_unreaction_matches_the_recorded_second_event(channel: str) -> None:
    built = simulator.page_reaction(**_page(channel, target_mid="m_9", emoji=None))
    event = recorded(channel, "reaction")["entry"][0]["messaging"][1]
    assert shape(built["entry"][0]["messaging"][0]) == shape(event)
    parse = messenger.parse if channel == "messenger" else instagram.parse
    [reaction] = parse(built)
    assert isinstance(reaction, Reaction) and reaction.removed and reaction.emoji is None


def test_messenger_has_no_unsend() -> None:
    with pytest.raises(ValueError, match="no unsend"):
        simulator.page_delete(channel="messenger", account=PAGE, user=USER, mid="m_1")


def test_bytes_are_escaped_and_signed_as_meta_does() -> None:
    payload = simulator.page_text(**_page("instagram", text="caf\u00e9 " + HEART, mid="m_1"))
    body, headers = simulator.signed(payload, "s3cret")
    assert b"caf\\u00e9 \\u2764\\ufe0f" in body
    assert body.isascii() and b" " not in body.replace(b"caf\\u00e9 ", b"")
    assert headers["X-Hub-Signature-256"] == sign(body, "s3cret")
    assert headers["X-Hub-Signature-256"].startswith("sha256=")
    assert json.loads(body) == payload


def test_new_mids_look_like_each_channels() -> None:
    assert simulator.new_mid("whatsapp").startswith("wamid.")
    assert simulator.new_mid("messenger").startswith("m_")
    assert simulator.new_mid("instagram").startswith("aWdf")
    assert simulator.new_mid("messenger") != simulator.new_mid("messenger")
