"""Instagram inbound adapter: one recorded payload per event kind, each with its exact events."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhooks.channels import instagram
from webhooks.channels.events import (
    ChannelEvent,
    Handover,
    InboundChoice,
    InboundMedia,
    InboundReferral,
    InboundStoryMention,
    InboundStoryReply,
    InboundText,
    InboundUnsupported,
    Media,
    MessageDeleted,
    MessageEcho,
    Reaction,
    ReadReceipt,
    Referral,
    Unhandled,
    triggers_reply,
)

PAYLOADS = Path(__file__).parents[1] / "payloads" / "instagram"
IG = "instagram"
ACCOUNT = "17841400000000001"
GIULIA, MARCO = "1123581321345589", "2246811223344556"
T0 = datetime(2026, 3, 2, 9, 15, tzinfo=UTC)
CDN = "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=179000000000000"


def load(name: str) -> Any:
    return json.loads((PAYLOADS / f"{name}.json").read_text())


def at(millis: int) -> datetime:
    return T0 + timedelta(milliseconds=millis)


def mid(n: int) -> str:
    return (
        "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAwMDAwMDAwMDAxOj"
        f"M0MDI4MjM2Njg0MTcxMDMwMTI0NDI1OTk1{n:04d}"
    )


def common(n: int, contact: str = GIULIA) -> dict[str, Any]:
    return {"channel": IG, "account_id": ACCOUNT, "contact_id": contact, "timestamp": at(n)}


def text(n: int, body: str, contact: str = GIULIA, **extra: Any) -> InboundText:
    return InboundText(IG, ACCOUNT, contact, None, mid(n), at(n), body, **extra)


CASES: dict[str, list[ChannelEvent]] = {
    "text": [text(1, "Do you ship to Milan?", reply_to=mid(900))],
    "attachments": [
        InboundMedia(
            **common(2),
            message_id=mid(2),
            media=(
                Media(kind="image", url=f"{CDN}01&signature=AbC1"),
                Media(kind="ig_reel", url=f"{CDN}02&signature=AbC2"),
            ),
        ),
        InboundMedia(
            **common(3),
            message_id=mid(3),
            media=(Media(kind="share", url=f"{CDN}03&signature=AbC3"),),
        ),
    ],
    "story_reply": [
        InboundStoryReply(
            **common(4),
            message_id=mid(4),
            story_id="17900000000000004",
            story_url=f"{CDN}04&signature=AbC4",
            text="Love this colour!",
        )
    ],
    "story_mention": [
        InboundStoryMention(**common(5), message_id=mid(5), url=f"{CDN}05&signature=AbC5")
    ],
    "unsend": [MessageDeleted(**common(6), original_message_id=mid(1))],
    "unsupported": [InboundUnsupported(**common(7), message_id=mid(7))],
    # Sender is the account, recipient the user: the contact is the user.
    "echo": [MessageEcho(**common(8), message_id=mid(8), text="Yes, we ship to Milan.")],
    "reaction": [
        Reaction(
            **common(9),
            target_message_id=mid(8),
            emoji="\u2764\ufe0f",
            removed=False,
            reaction="love",
        ),
        Reaction(**common(10), target_message_id=mid(8), emoji=None, removed=True),
    ],
    "read": [ReadReceipt(**common(11), message_id=mid(8))],
    "postback": [
        InboundChoice(
            **common(12),
            message_id=mid(12),
            kind="postback",
            payload="ICEBREAKER_HOURS",
            title="Opening hours",
        )
    ],
    "quick_reply": [
        InboundChoice(
            **common(13), message_id=mid(13), kind="quick_reply", payload="SIZE:M", title="Size M"
        )
    ],
    "referral": [
        InboundReferral(
            **common(14), referral=Referral(ref="bio-link", source="IGME", type="OPEN_THREAD")
        )
    ],
    "handover": [
        Handover(
            **common(15),
            action="pass_thread_control",
            new_owner_app_id="555000111222333",
            previous_owner_app_id="1234567890123456",
            metadata="handoff",
        ),
        Handover(
            **common(16),
            action="take_thread_control",
            new_owner_app_id="1234567890123456",
            previous_owner_app_id="555000111222333",
        ),
        Handover(
            **common(17),
            action="request_thread_control",
            requested_owner_app_id="555000111222333",
            metadata="agent request",
        ),
    ],
    # Two entries; messaging, standby and a non-messaging field mixed.
    "batch": [
        text(20, "Ciao!"),
        MessageEcho(**common(21), message_id=mid(21), text="Ciao, come possiamo aiutarti?"),
        ReadReceipt(**common(22), message_id=mid(21)),
        text(23, "Grazie", MARCO, standby=True),
        InboundStoryMention(**common(24, MARCO), message_id=mid(24), url=f"{CDN}24&signature=AbC6"),
        Unhandled(
            IG,
            ACCOUNT,
            "field:comments",
            {
                "field": "comments",
                "value": {
                    "id": "17999999999999999",
                    "text": "Nice!",
                    "from": {"id": MARCO, "username": "marco.b"},
                },
            },
        ),
    ],
}


def test_every_recorded_payload_has_a_case() -> None:
    assert {path.stem for path in PAYLOADS.glob("*.json")} == set(CASES)


@pytest.mark.parametrize(("name", "expected"), CASES.items(), ids=list(CASES))
def test_recorded_payload(name: str, expected: list[ChannelEvent]) -> None:
    assert instagram.parse(load(name)) == expected


def test_only_user_content_outside_standby_triggers_a_reply() -> None:
    replies = [triggers_reply(event) for event in instagram.parse(load("batch"))]
    assert replies == [True, False, False, False, False, False]
    for name in ("echo", "reaction", "read", "unsend", "story_mention", "handover"):
        assert not any(triggers_reply(e) for e in instagram.parse(load(name))), name
    for name in ("text", "attachments", "story_reply", "postback", "quick_reply"):
        assert all(triggers_reply(e) for e in instagram.parse(load(name))), name


def test_a_messenger_payload_is_not_read_as_instagram() -> None:
    payload = {"object": "page", "entry": [{"id": ACCOUNT, "messaging": []}]}
    assert instagram.parse(payload) == [Unhandled(IG, None, "unknown_object", payload)]


def test_echo_feeds_the_ambiguous_send_matcher() -> None:
    (echo,) = instagram.parse(load("echo"))
    assert isinstance(echo, MessageEcho)
    sent = instagram.PendingSend(7, GIULIA, instagram.text_hash("Yes, we ship to Milan."), at(0))
    assert instagram.echo_of(echo) == instagram.Echo(GIULIA, sent.text_hash, at(8))
    assert instagram.match_echo([sent], instagram.Echo(GIULIA, sent.text_hash, at(8))) == sent
    assert instagram.echo_of(MessageEcho(**common(1), message_id=mid(1))) is None


# --- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)
MESSAGE_KEYS = st.sampled_from(
    ["text", "attachments", "reply_to", "is_echo", "is_deleted", "is_unsupported", "quick_reply"]
)
bodies = st.dictionaries(MESSAGE_KEYS, json_values | st.just(True), max_size=4).map(
    lambda body: {"mid": mid(1)} | body
)
attachment = st.builds(
    lambda kind, payload: {"type": kind, "payload": payload},
    st.sampled_from(["image", "story_mention", "share", "ig_reel", "location"]) | st.text(),
    json_values | st.just({"url": "https://lookaside.fbsbx.com/x"}),
)
items = st.builds(
    lambda key, body, sender: {
        "sender": sender,
        "recipient": {"id": ACCOUNT},
        "timestamp": 1772442900001,
        key: body,
    },
    st.sampled_from(["message", "reaction", "read", "postback", "referral", "pass_thread_control"]),
    bodies | bodies.map(lambda b: b | {"attachments": []}) | json_values,
    st.just({"id": GIULIA}) | json_values,
)
stories = st.builds(
    lambda story, attachments: {
        "sender": {"id": GIULIA},
        "recipient": {"id": ACCOUNT},
        "timestamp": 1772442900001,
        "message": {"mid": mid(1), "reply_to": {"story": story}, "attachments": attachments},
    },
    json_values,
    st.lists(attachment, max_size=3),
)


def _check(events: list[ChannelEvent]) -> None:
    for event in events:
        assert isinstance(event, ChannelEvent)
        repr(event)
        triggers_reply(event)
        timestamp = getattr(event, "timestamp", None)
        assert timestamp is None or timestamp.tzinfo is UTC


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parse_never_raises_on_arbitrary_json(value: object) -> None:
    _check(instagram.parse(value))


@settings(max_examples=300, deadline=None)
@given(st.lists(items | stories | json_values, max_size=4), st.lists(items | stories, max_size=3))
def test_every_messaging_and_standby_item_yields_exactly_one_event(
    messaging: list[Any], standby: list[Any]
) -> None:
    payload = {
        "object": "instagram",
        "entry": [{"id": ACCOUNT, "time": 1, "messaging": messaging, "standby": standby}],
    }
    events = instagram.parse(payload)
    _check(events)
    if messaging or standby:
        assert len(events) == len(messaging) + len(standby)
        for event in events[len(messaging) :]:
            assert not triggers_reply(event)
