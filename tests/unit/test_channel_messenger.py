"""Messenger inbound adapter: one recorded payload per event kind, each with its exact events."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhooks.channels import messenger
from webhooks.channels.events import (
    ChannelEvent,
    DeliveryReceipt,
    Handover,
    InboundChoice,
    InboundLocation,
    InboundMedia,
    InboundReferral,
    InboundText,
    Media,
    MessageEcho,
    MessageEdited,
    OptIn,
    Reaction,
    ReadReceipt,
    Referral,
    Unhandled,
    triggers_reply,
)

PAYLOADS = Path(__file__).parents[1] / "payloads" / "messenger"
FB = "messenger"
PAGE = "104857600000001"
ANA, BEN = "6283019475561234", "7390128456672345"
OUR_APP, INBOX_APP = "1234567890123456", "555000111222333"
T0 = datetime(2026, 3, 2, 9, 15, tzinfo=UTC)


def load(name: str) -> Any:
    return json.loads((PAYLOADS / f"{name}.json").read_text())


def at(millis: int) -> datetime:
    return T0 + timedelta(milliseconds=millis)


def mid(n: int) -> str:
    return f"m_Zq8uA1tBv2Yc3Xd4Ve5Uf6Tg7Sh8Ri9Qj0Pk1Ol2Nm3Mn4Lo5Kp6Jq7Ir8Hs9Gt0Fu{n:03d}"


def text(n: int, body: str, contact: str = ANA, **extra: Any) -> InboundText:
    return InboundText(FB, extra.pop("account", PAGE), contact, None, mid(n), at(n), body, **extra)


def common(n: int, contact: str = ANA) -> dict[str, Any]:
    return {"channel": FB, "account_id": PAGE, "contact_id": contact, "timestamp": at(n)}


def handover(n: int, action: str, **extra: Any) -> Handover:
    return Handover(**common(n), action=action, **extra)


CASES: dict[str, list[ChannelEvent]] = {
    "text": [text(1, "Do you deliver to Porto?", reply_to=mid(900))],
    "attachments": [
        InboundMedia(
            **common(2),
            message_id=mid(2),
            media=(
                Media(
                    kind="image",
                    url="https://scontent.xx.fbcdn.net/v/t1.15752-9/photo-1.jpg?stp=dst-jpg&oh=00_AfD1&oe=6A00B1C2",
                ),
                Media(
                    kind="document",
                    url="https://cdn.fbsbx.com/v/t59.2708-21/receipt.pdf?oh=00_AfE2&oe=6A00B1C3",
                ),
            ),
            caption="Here are the photos",
        ),
        InboundMedia(
            **common(3),
            message_id=mid(3),
            media=(
                Media(
                    kind="sticker", url="https://scontent.xx.fbcdn.net/v/t39.1997-6/thumbs-up.png"
                ),
            ),
        ),
        InboundMedia(
            **common(4),
            message_id=mid(4),
            media=(
                Media(
                    kind="audio",
                    url="https://cdn.fbsbx.com/v/t59.3654-21/voice.mp4?oh=00_AfF3&oe=6A00B1C4",
                ),
            ),
        ),
    ],
    "location": [
        InboundLocation(
            **common(5),
            message_id=mid(5),
            latitude=41.14961,
            longitude=-8.61099,
            name="Ana's location",
            url="https://l.facebook.com/l.php?u=https%3A%2F%2Fwww.bing.com%2Fmaps%2F%3Flvl%3D16",
        )
    ],
    "quick_reply": [
        InboundChoice(
            **common(6),
            message_id=mid(6),
            kind="quick_reply",
            payload="DELIVERY_DAY:TOMORROW",
            title="Tomorrow",
        )
    ],
    "postback": [
        InboundChoice(
            **common(7),
            message_id=mid(7),
            kind="postback",
            payload="GET_STARTED",
            title="Get Started",
            referral=Referral(ref="spring-campaign", source="SHORTLINK", type="OPEN_THREAD"),
        ),
        # No mid (before Graph API v11): sender and timestamp identify the tap.
        InboundChoice(
            **common(8),
            message_id=f"postback:{ANA}:1772442900008",
            kind="postback",
            payload="TRACK_ORDER",
            title="Track my order",
        ),
    ],
    "referral": [
        InboundReferral(
            **common(9),
            referral=Referral(
                source="ADS",
                type="OPEN_THREAD",
                ref="summer-promo",
                ad_id="120210000000000077",
                headline="Free delivery this week",
                image_url="https://scontent.xx.fbcdn.net/v/ad-photo.jpg",
                post_id="104857600000001_998877665544332",
            ),
        ),
        InboundReferral(
            channel=FB,
            account_id=PAGE,
            contact_id=None,
            user_ref="d3f1c2b0-visitor-42",
            timestamp=at(10),
            referral=Referral(
                source="CUSTOMER_CHAT_PLUGIN",
                type="OPEN_THREAD",
                ref="pricing-page",
                referer_uri="https://shop.example.pt/pricing",
            ),
        ),
    ],
    "reaction": [
        Reaction(
            **common(11),
            target_message_id=mid(950),
            emoji="\u2764\ufe0f",
            removed=False,
            reaction="love",
        ),
        Reaction(**common(12), target_message_id=mid(950), emoji=None, removed=True),
    ],
    "message_edit": [
        MessageEdited(
            **common(13),
            original_message_id=mid(1),
            text="Do you deliver to Braga?",
            edit_count=1,
        )
    ],
    # Sender is the Page, recipient the user: the contact is the user.
    "echo": [
        MessageEcho(
            **common(14),
            message_id=mid(14),
            text="Yes, we deliver to Porto.",
            app_id=OUR_APP,
            metadata="chunk:5120:0",
        ),
        MessageEcho(
            **common(15),
            message_id=mid(15),
            text="Hi Ana, this is Rita from the shop.",
            app_id=INBOX_APP,
        ),
    ],
    "read": [ReadReceipt(**common(16), watermark=at(15))],
    "delivery": [DeliveryReceipt(**common(17), message_ids=(mid(14), mid(15)), watermark=at(15))],
    "optin": [
        OptIn(
            **common(18),
            type="notification_messages",
            payload="WEEKLY_DEALS",
            title="Weekly deals",
            token="7391926459017261549",
            token_expires_at=datetime(2026, 8, 29, 9, 15, tzinfo=UTC),
            notification_status="RESUME_NOTIFICATIONS",
            frequency="WEEKLY",
        ),
        OptIn(
            channel=FB,
            account_id=PAGE,
            contact_id=None,
            timestamp=at(19),
            ref="checkout-checkbox",
            user_ref="a91e6b7c-checkbox-7",
        ),
    ],
    "handover": [
        handover(
            20,
            "pass_thread_control",
            new_owner_app_id=INBOX_APP,
            previous_owner_app_id=OUR_APP,
            metadata="customer asked for a human",
        ),
        handover(
            21,
            "take_thread_control",
            new_owner_app_id=OUR_APP,
            previous_owner_app_id=INBOX_APP,
            metadata="conversation idle",
        ),
        handover(
            22,
            "request_thread_control",
            requested_owner_app_id=INBOX_APP,
            metadata="agent wants this thread",
        ),
    ],
    "standby": [
        text(23, "Still there?"),
        text(24, "Thanks Rita, that helps", standby=True),
        MessageEcho(
            **common(25),
            message_id=mid(25),
            text="You're welcome!",
            app_id=INBOX_APP,
            standby=True,
        ),
        ReadReceipt(**common(26), watermark=at(25), standby=True),
    ],
    "other_event": [
        Unhandled(
            FB,
            PAGE,
            "event:account_linking",
            {
                "sender": {"id": ANA},
                "recipient": {"id": PAGE},
                "timestamp": 1772442900027,
                "account_linking": {"status": "linked", "authorization_code": "auth-code-1"},
            },
        )
    ],
    # Three entries (two Pages), messaging and standby mixed.
    "batch": [
        text(30, "Bom dia"),
        DeliveryReceipt(**common(31), message_ids=(mid(29),), watermark=at(29)),
        InboundChoice(
            **common(32, BEN),
            message_id=mid(32),
            kind="postback",
            payload="HUMAN",
            title="Talk to a person",
        ),
        Reaction(
            **common(33, BEN),
            target_message_id=mid(30),
            emoji="\U0001f44d",
            removed=False,
            reaction="like",
        ),
        text(34, "Ok", BEN, standby=True),
        text(35, "Second page here", account="104857600000002"),
    ],
}


def test_every_recorded_payload_has_a_case() -> None:
    assert {path.stem for path in PAYLOADS.glob("*.json")} == set(CASES)


@pytest.mark.parametrize(("name", "expected"), CASES.items(), ids=list(CASES))
def test_recorded_payload(name: str, expected: list[ChannelEvent]) -> None:
    assert messenger.parse(load(name)) == expected


def test_echoes_reads_deliveries_reactions_and_standby_never_trigger_a_reply() -> None:
    replies = {
        name: [triggers_reply(event) for event in messenger.parse(load(name))] for name in CASES
    }
    assert replies["standby"] == [True, False, False, False]
    for name in ("echo", "read", "delivery", "reaction", "handover", "optin", "referral"):
        assert not any(replies[name]), name
    for name in ("text", "attachments", "location", "quick_reply", "postback"):
        assert all(replies[name]), name


def _item(**fields: Any) -> dict[str, Any]:
    item = {"sender": {"id": ANA}, "recipient": {"id": PAGE}, "timestamp": 1772442900090}
    return {"object": "page", "entry": [{"id": PAGE, "messaging": [item | fields]}]}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"object": "instagram", "entry": []}, "unknown_object"),
        ({"object": "page"}, "no_entries"),
        ({"object": "page", "entry": [{"messaging": []}]}, "malformed_entry"),
        ({"object": "page", "entry": [{"id": PAGE}]}, "empty_entry"),
        ({"object": "page", "entry": [{"id": PAGE, "messaging": {}}]}, "malformed_messaging"),
        ({"object": "page", "entry": [{"id": PAGE, "standby": "x"}]}, "malformed_standby"),
        (
            {"object": "page", "entry": [{"id": PAGE, "changes": [{"field": "feed"}]}]},
            "field:feed",
        ),
        (_item(message={"text": "no mid"}), "malformed_event"),
        (_item(message={"mid": mid(1), "text": "hi"}, timestamp="later"), "malformed_event"),
        (_item(message={"mid": mid(1), "text": "hi"}, sender={}), "malformed_event"),
        (_item(message={"mid": mid(1)}), "malformed_event"),
        (_item(reaction={"mid": mid(1), "action": "maybe"}), "malformed_event"),
        (_item(read={}), "malformed_event"),
        (_item(postback={"title": "no payload"}), "malformed_event"),
        (_item(app_roles={"123": ["primary_receiver"]}), "event:app_roles"),
        (_item(), "event:unknown"),
    ],
)
def test_odd_shapes_become_unhandled(payload: Any, reason: str) -> None:
    (event,) = messenger.parse(payload)
    assert isinstance(event, Unhandled) and event.reason == reason


def test_timestamps_in_seconds_are_not_read_as_1970() -> None:
    (event,) = messenger.parse(_item(message={"mid": mid(1), "text": "hi"}, timestamp="1772442900"))
    assert event == InboundText(FB, PAGE, ANA, None, mid(1), T0, "hi")


# --- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)
KEYS = st.sampled_from(
    [
        "message",
        "message_edit",
        "postback",
        "reaction",
        "read",
        "delivery",
        "referral",
        "optin",
        "pass_thread_control",
        "take_thread_control",
        "request_thread_control",
        "account_linking",
    ]
)
MESSAGE_KEYS = st.sampled_from(
    [
        "text",
        "attachments",
        "quick_reply",
        "reply_to",
        "referral",
        "is_echo",
        "app_id",
        "metadata",
        "is_deleted",
        "is_unsupported",
    ]
)
bodies = st.dictionaries(MESSAGE_KEYS, json_values | st.just(True), max_size=5).map(
    lambda body: {"mid": mid(1)} | body
)
items = st.builds(
    lambda key, body, sender: {
        "sender": sender,
        "recipient": {"id": PAGE},
        "timestamp": 1772442900001,
        key: body,
    },
    KEYS,
    bodies | json_values,
    st.just({"id": ANA}) | json_values,
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
    _check(messenger.parse(value))


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_parse_never_raises_inside_a_well_formed_envelope(messaging: Any, standby: Any) -> None:
    payload = {
        "object": "page",
        "entry": [{"id": PAGE, "messaging": messaging, "standby": standby}],
    }
    _check(messenger.parse(payload))


@settings(max_examples=300, deadline=None)
@given(st.lists(items | json_values, max_size=4), st.lists(items, max_size=4))
def test_every_messaging_and_standby_item_yields_exactly_one_event(
    messaging: list[Any], standby: list[Any]
) -> None:
    payload = {
        "object": "page",
        "entry": [{"id": PAGE, "messaging": messaging, "standby": standby}],
    }
    events = messenger.parse(payload)
    _check(events)
    if messaging or standby:
        assert len(events) == len(messaging) + len(standby)
        for event in events[len(messaging) :]:
            assert not triggers_reply(event)
