"""WhatsApp inbound adapter: one recorded payload per event kind, each with its exact events."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhooks.channels import whatsapp
from webhooks.channels.events import (
    ChannelEvent,
    InboundChoice,
    InboundContacts,
    InboundLocation,
    InboundMedia,
    InboundText,
    InboundUnsupported,
    MarketingPreference,
    Media,
    MessageDeleted,
    MessageEdited,
    Reaction,
    Referral,
    SharedContact,
    SharedPhone,
    StatusUpdate,
    TemplateStatus,
    Unhandled,
)

PAYLOADS = Path(__file__).parents[1] / "payloads" / "whatsapp"
WA = "whatsapp"
WABA = "200000000000001"
NUMBER = "109876543210001"
LENA, TIAGO = "4915112345678", "5511987654321"
T0 = datetime(2026, 3, 2, 9, 15, tzinfo=UTC)


def load(name: str) -> Any:
    return json.loads((PAYLOADS / f"{name}.json").read_text())


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def wamid(n: int) -> str:
    """The id of the n-th message the contact sent in these payloads."""
    return f"wamid.HBgNNDkxNTExMjM0NTY3OBUCABIYFDNBQjQ{n:04d}AA=="


def ours(suffix: str) -> str:
    """The id of a message the business sent."""
    return f"wamid.HBgNNDkxNTExMjM0NTY3OBUCABEYEjQyQUJDMDAwMDAwMDAwMDAw{suffix}"


def text(n: int, body: str, **extra: Any) -> InboundText:
    return InboundText(WA, NUMBER, LENA, "Lena Vogel", wamid(n), at(n), body, **extra)


def media(n: int, item: Media, **extra: Any) -> InboundMedia:
    fields: dict[str, Any] = {"contact_id": LENA, "contact_name": "Lena Vogel"} | extra
    return InboundMedia(
        channel=WA, account_id=NUMBER, message_id=wamid(n), timestamp=at(n), media=(item,), **fields
    )


def choice(n: int, kind: str, payload: str, title: str, **extra: Any) -> InboundChoice:
    return InboundChoice(
        channel=WA,
        account_id=NUMBER,
        contact_id=LENA,
        contact_name="Lena Vogel",
        message_id=wamid(n),
        timestamp=at(n),
        kind=kind,
        payload=payload,
        title=title,
        **extra,
    )


def status(n: int, state: str, message: str, **extra: Any) -> StatusUpdate:
    return StatusUpdate(WA, NUMBER, message, state, at(n), **extra)


CASES: dict[str, list[ChannelEvent]] = {
    "text": [text(1, "Is the blue kettle back in stock?", reply_to=ours("MQA="))],
    "text_forwarded": [
        text(2, "Look at this deal", forwarded=True),
        text(3, "Chain message, please share", frequently_forwarded=True),
    ],
    "referral": [
        text(
            4,
            "Hi! I saw your ad about the spring sale.",
            referral=Referral(
                source="ad",
                source_id="120210000000000001",
                source_url="https://fb.me/3cY7pQ2kL",
                headline="Spring sale: 20% off kettles",
                body="Tap to chat with us on WhatsApp",
                media_type="image",
                image_url="https://scontent.example.net/v/t45/spring-sale.jpg",
                ctwa_clid="ARAkLkA8rmlFeiCktEJQ-QTwRiyYHAFDLMNDBH0CD3qpjd0HR4irJ6LEkR7JwFF4XvnO2E4Nx0-eM-GABDLOPaOdRMv-_zfUQ2a",
            ),
        )
    ],
    "image": [
        media(
            5,
            Media(
                kind="image",
                media_id="1183456789012345",
                mime_type="image/jpeg",
                sha256="nm0+Wc7UzWl9QJ6yDmn5YoUzyZ4wTPE0M6ZkHk6TnQE=",
            ),
            caption="This one, in blue",
        )
    ],
    "video": [
        media(
            6,
            Media(
                kind="video",
                media_id="1183456789012346",
                mime_type="video/mp4",
                sha256="Q2nJk9x0cz2H5vG0rS3nJtJ7l8b3Vw5rA1l0nB3kFzU=",
            ),
            forwarded=True,
        )
    ],
    "audio": [
        media(
            7,
            Media(
                kind="audio",
                media_id="1183456789012347",
                mime_type="audio/ogg; codecs=opus",
                sha256="u5V4m0a3o9YzTnRk1q2w3e4r5t6y7u8i9o0pAaSsDdF=",
                voice=True,
            ),
        ),
        media(
            8,
            Media(
                kind="audio",
                media_id="1183456789012348",
                mime_type="audio/mpeg",
                sha256="Zx8Cv7Bn6Mm5Ll4Kk3Jj2Hh1Gg0Ff9Ee8Dd7Cc6Bb5A=",
            ),
        ),
    ],
    "document": [
        media(
            9,
            Media(
                kind="document",
                media_id="1183456789012349",
                mime_type="application/pdf",
                sha256="p0O9i8U7y6T5r4E3w2Q1a2S3d4F5g6H7j8K9l0ZxCvB=",
                filename="invoice-2026-0042.pdf",
            ),
            caption="My invoice",
        )
    ],
    "sticker": [
        media(
            10,
            Media(
                kind="sticker",
                media_id="1183456789012350",
                mime_type="image/webp",
                sha256="S7t6I5c4K3e2R1s0A9n8I7m6A5t4E3d2W1e1B2p3Q4r=",
                animated=True,
            ),
        )
    ],
    "location": [
        InboundLocation(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            contact_name="Lena Vogel",
            message_id=wamid(11),
            timestamp=at(11),
            latitude=52.520008,
            longitude=13.404954,
            name="Kettle & Co. Mitte",
            address="Rosenthaler Str. 1, 10119 Berlin",
            url="https://maps.google.com/?cid=1234567890123456789",
        )
    ],
    "contacts": [
        InboundContacts(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            contact_name="Lena Vogel",
            message_id=wamid(12),
            timestamp=at(12),
            contacts=(
                SharedContact(
                    name="Mara Lindqvist",
                    phones=(
                        SharedPhone(phone="+46 70 123 45 67", wa_id="46701234567", type="CELL"),
                    ),
                    emails=("mara@example.se",),
                    organization="Lindqvist AB",
                ),
                SharedContact(
                    name="Omar Haddad", phones=(SharedPhone(phone="+961 3 123 456", type="HOME"),)
                ),
            ),
        )
    ],
    "interactive_button_reply": [
        choice(13, "button_reply", "order:confirm:8812", "Confirm order", reply_to=ours("MgA="))
    ],
    "interactive_list_reply": [
        choice(
            14,
            "list_reply",
            "slot:2026-03-03T10:00",
            "Tue 10:00",
            description="Berlin Mitte store",
            reply_to=ours("MwA="),
        )
    ],
    "template_button": [
        choice(15, "template_button", "RESCHEDULE_DELIVERY", "Reschedule", reply_to=ours("NAA="))
    ],
    "reaction": [
        Reaction(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            target_message_id=ours("MQA="),
            timestamp=at(16),
            emoji="\U0001f44d",
            removed=False,
            message_id=wamid(16),
        )
    ],
    "unreaction": [
        Reaction(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            target_message_id=ours(target),
            timestamp=at(n),
            emoji=None,
            removed=True,
            message_id=wamid(n),
        )
        for n, target in ((17, "MQA="), (18, "MgA="))
    ],
    "edit": [
        MessageEdited(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            original_message_id=wamid(1),
            timestamp=at(19),
            text="Is the green kettle back in stock?",
            message_id=wamid(19),
        )
    ],
    "revoke": [
        MessageDeleted(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            original_message_id=wamid(5),
            timestamp=at(20),
            message_id=wamid(20),
        )
    ],
    "unsupported": [
        InboundUnsupported(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            contact_name="Lena Vogel",
            message_id=wamid(21),
            timestamp=at(21),
            error_codes=(131051,),
            unsupported_type="poll_creation",
        ),
        InboundUnsupported(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            contact_name="Lena Vogel",
            message_id=wamid(22),
            timestamp=at(22),
            error_codes=(131060,),
        ),
    ],
    "statuses": [
        status(30, "sent", ours("MQA="), callback_data="5012:0"),
        status(31, "delivered", ours("MQA="), callback_data="5012:0"),
        status(45, "read", ours("MQA="), callback_data="5012:0"),
        StatusUpdate(
            WA,
            NUMBER,
            "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEjQyQUJDMDAwMDAwMDAwMDAwNQA=",
            "failed",
            at(50),
            error_code=131047,
            callback_data="5013:1",
        ),
    ],
    "user_preferences": [
        MarketingPreference(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            timestamp=at(60),
            value="stop",
            category="marketing_messages",
            detail="User requested to stop marketing messages",
        ),
        MarketingPreference(
            channel=WA,
            account_id=NUMBER,
            contact_id=TIAGO,
            timestamp=at(61),
            value="resume",
            category="marketing_messages",
            detail="User requested to resume marketing messages",
        ),
    ],
    "template_status": [
        TemplateStatus(
            channel=WA,
            account_id=WABA,
            name="delivery_reschedule",
            status="REJECTED",
            language="de",
            template_id="1489012345678901",
            reason="INCORRECT_CATEGORY",
            timestamp=at(120),
        )
    ],
    "other_field": [
        Unhandled(
            WA,
            None,
            "field:account_update",
            {
                "value": {"phone_number": "15550101010", "event": "VERIFIED_ACCOUNT"},
                "field": "account_update",
            },
        )
    ],
    # Two entries, several changes; contacts listed in another order than the messages.
    "batch": [
        text(40, "Guten Morgen"),
        InboundMedia(
            channel=WA,
            account_id=NUMBER,
            contact_id=TIAGO,
            contact_name="Tiago Alves",
            message_id=wamid(41),
            timestamp=at(41),
            media=(
                Media(
                    kind="image",
                    media_id="1183456789012399",
                    mime_type="image/png",
                    sha256="a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0u1V=",
                ),
            ),
        ),
        Reaction(
            channel=WA,
            account_id=NUMBER,
            contact_id=LENA,
            target_message_id=ours("MQA="),
            timestamp=at(42),
            emoji="\u2764\ufe0f",
            removed=False,
            message_id=wamid(42),
        ),
        status(43, "delivered", "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABEYEjQyQUJDMDAwMDAwMDAwMDAwNgA="),
        InboundLocation(
            channel=WA,
            account_id="109876543210002",
            contact_id=TIAGO,
            contact_name="Tiago Alves",
            message_id=wamid(44),
            timestamp=at(44),
            latitude=-23.55052,
            longitude=-46.633308,
        ),
        Unhandled(
            WA,
            None,
            "field:message_template_quality_update",
            {
                "value": {
                    "previous_quality_score": "GREEN",
                    "new_quality_score": "YELLOW",
                    "message_template_id": 1489012345678901,
                    "message_template_name": "delivery_reschedule",
                    "message_template_language": "de",
                },
                "field": "message_template_quality_update",
            },
        ),
    ],
}


def test_every_recorded_payload_has_a_case() -> None:
    recorded = {path.stem for path in PAYLOADS.glob("*.json")} - {"text_batch"}
    assert recorded == set(CASES)


@pytest.mark.parametrize(("name", "expected"), CASES.items(), ids=list(CASES))
def test_recorded_payload(name: str, expected: list[ChannelEvent]) -> None:
    assert whatsapp.parse_events(load(name)) == expected


def test_intake_view_keeps_the_earlier_events_and_reasons() -> None:
    """``parse`` is what the intake service reads today: new kinds arrive as Unhandled with the
    reason and raw object the service has always recorded."""
    payload = load("batch")
    messages = payload["entry"][0]["changes"][0]["value"]["messages"]
    location = payload["entry"][1]["changes"][0]["value"]["messages"][0]
    events = whatsapp.parse(payload)
    full = CASES["batch"]
    assert events == [
        full[0],
        Unhandled(WA, NUMBER, "message_type:image", messages[1]),
        Unhandled(WA, NUMBER, "message_type:reaction", messages[2]),
        full[3],
        Unhandled(WA, "109876543210002", "message_type:location", location),
        full[5],
    ]
    preferences = load("user_preferences")
    assert whatsapp.parse(preferences) == [
        Unhandled(WA, NUMBER, "field:user_preferences", preferences["entry"][0]["changes"][0])
    ]
    for name in CASES:
        for event in whatsapp.parse(load(name)):
            assert isinstance(event, InboundText | StatusUpdate | Unhandled)


def _message(**fields: Any) -> dict[str, Any]:
    message = {"from": LENA, "id": wamid(90), "timestamp": "1772442990", "type": "text"}
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": WABA,
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "metadata": {"phone_number_id": NUMBER},
                            "messages": [message | fields],
                        },
                    }
                ],
            }
        ],
    }


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"text": {"body": "a\x00b"}}, "malformed_message"),  # Postgres text cannot hold NUL
        ({"text": {"body": "\ud800"}}, "malformed_message"),  # a lone surrogate is not UTF-8
        ({"text": {"body": "x" * 65_537}}, "malformed_message"),
        ({"text": {"body": 7}}, "malformed_message"),
        ({"text": {"body": "hi"}, "timestamp": "soon"}, "malformed_message"),
        ({"text": {"body": "hi"}, "timestamp": True}, "malformed_message"),
        ({"text": {"body": "hi"}, "from": ["x"]}, "malformed_message"),
        ({"type": "image", "image": {"mime_type": "image/png"}}, "malformed_message"),
        ({"type": "location", "location": {"latitude": 91, "longitude": 0}}, "malformed_message"),
        ({"type": "reaction", "reaction": {"emoji": "x"}}, "malformed_message"),
        (
            {"type": "interactive", "interactive": {"type": "nfm_reply"}},
            "message_type:interactive:nfm_reply",
        ),
        ({"type": "order", "order": {"catalog_id": "1"}}, "message_type:order"),
        ({"type": "system", "system": {"body": "changed number"}}, "message_type:system"),
        ({"type": {"nested": 1}}, "message_type:dict"),
    ],
)
def test_invalid_or_unknown_messages_are_unhandled(fields: dict[str, Any], reason: str) -> None:
    (event,) = whatsapp.parse_events(_message(**fields))
    assert isinstance(event, Unhandled) and event.reason == reason


def test_optional_values_that_fail_validation_are_dropped() -> None:
    (event,) = whatsapp.parse_events(
        _message(
            text={"body": "hi"},
            context={"id": {"not": "an id"}, "forwarded": "yes"},
            referral={"headline": 5},
        )
    )
    assert event == InboundText(WA, NUMBER, LENA, None, wamid(90), at(90), "hi")


def test_a_fault_in_one_message_never_drops_the_others() -> None:
    payload = _message(text={"body": "first"})
    value = payload["entry"][0]["changes"][0]["value"]
    value["messages"] += [None, {"from": LENA}, value["messages"][0] | {"id": wamid(91)}]
    events = whatsapp.parse_events(payload)
    assert [type(e).__name__ for e in events] == [
        "InboundText",
        "Unhandled",
        "Unhandled",
        "InboundText",
    ]


# --- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)
TYPES = st.sampled_from(
    [
        "text",
        "image",
        "video",
        "audio",
        "document",
        "sticker",
        "location",
        "contacts",
        "interactive",
        "button",
        "reaction",
        "edit",
        "revoke",
        "unsupported",
        "order",
    ]
)
messages = st.builds(
    lambda kind, body, context, referral: {
        "from": LENA,
        "id": wamid(1),
        "timestamp": "1772442901",
        "type": kind,
        kind: body,
        "context": context,
        "referral": referral,
        "contacts": body,
        "errors": body,
    },
    TYPES,
    json_values,
    json_values,
    json_values,
)


def _envelope(field: Any, value: Any) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": WABA, "changes": [{"field": field, "value": value}]}],
    }


def _check(events: list[ChannelEvent]) -> None:
    for event in events:
        assert isinstance(event, ChannelEvent)
        repr(event)
        timestamp = getattr(event, "timestamp", None)
        assert timestamp is None or timestamp.tzinfo is UTC


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parse_never_raises_on_arbitrary_json(value: object) -> None:
    _check(whatsapp.parse_events(value))
    whatsapp.parse(value)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["messages", "user_preferences", "message_template_status_update", "calls"]),
    json_values,
    st.lists(messages | json_values, max_size=4),
    json_values,
)
def test_parse_never_raises_inside_a_well_formed_envelope(
    field: str, anything: Any, items: list[Any], statuses: Any
) -> None:
    value = {
        "metadata": {"phone_number_id": NUMBER},
        "contacts": [{"wa_id": LENA, "profile": anything}],
        "messages": items,
        "statuses": [statuses],
        "user_preferences": [anything],
        "event": anything,
        "message_template_name": anything,
    }
    events = whatsapp.parse_events(_envelope(field, value))
    _check(events)
    whatsapp.parse(_envelope(field, value))
    if field == "messages":
        # Every message and every status yields exactly one event: nothing is dropped.
        assert len(events) == len(items) + 1


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5))
def test_every_message_yields_exactly_one_event(items: list[Any]) -> None:
    value = {"metadata": {"phone_number_id": NUMBER}, "messages": items}
    events = whatsapp.parse_events(_envelope("messages", value))
    assert len(events) == len(items)
    _check(events)
