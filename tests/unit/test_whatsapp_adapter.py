"""The WhatsApp adapter is pure: recorded payloads in, exact normalized events out."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhooks.channels import meta, whatsapp
from webhooks.channels.events import InboundText, StatusUpdate, Unhandled

PAYLOADS = Path(__file__).parents[1] / "payloads" / "whatsapp"


def test_batch_yields_every_event_with_contacts_matched_by_id() -> None:
    events = whatsapp.parse(json.loads((PAYLOADS / "text_batch.json").read_text()))
    assert events[0] == InboundText(
        channel="whatsapp",
        account_id="106540352242922",
        contact_id="919876543210",
        contact_name="Ravi Kumar",  # the second contact, matched by wa_id, not by position
        message_id="wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
        timestamp=datetime(2025, 6, 8, 20, 59, 43, tzinfo=UTC),
        text="Does it come in another color?",
        reply_to="wamid.HBgLMTY0NjcwNDM1OTUVAgARGBI1QjJGRjI0RUQ2RTBBQ0YwMzgA",
    )
    assert isinstance(events[1], Unhandled) and events[1].reason == "message_type:image"
    assert events[2] == StatusUpdate(
        channel="whatsapp",
        account_id="106540352242922",
        message_id="wamid.HBgLMTY0NjcwNDM1OTUVAgARGBI1QjJGRjI0RUQ2RTBBQ0YwMzgA",
        status="failed",
        timestamp=datetime(2025, 6, 18, 16, 22, 53, tzinfo=UTC),
        error_code=131047,
    )
    assert isinstance(events[3], Unhandled) and events[3].reason == "field:user_preferences"
    assert len(events) == 4


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (None, "unknown_object"),
        ({"object": "page", "entry": []}, "unknown_object"),
        ({"object": "whatsapp_business_account"}, "no_entries"),
        ({"object": "whatsapp_business_account", "entry": [1]}, "malformed_entry"),
        ({"object": "whatsapp_business_account", "entry": [{"changes": [7]}]}, "malformed_change"),
        (
            {
                "object": "whatsapp_business_account",
                "entry": [{"changes": [{"field": "messages", "value": {}}]}],
            },
            "malformed_value",
        ),
        (
            {
                "object": "whatsapp_business_account",
                "entry": [
                    {
                        "changes": [
                            {
                                "field": "messages",
                                "value": {
                                    "metadata": {"phone_number_id": "1"},
                                    "messages": [{"id": "x"}],
                                },
                            }
                        ]
                    }
                ],
            },
            "malformed_message",
        ),
    ],
)
def test_odd_shapes_become_unhandled_events(payload: object, reason: str) -> None:
    events = whatsapp.parse(payload)
    assert [e.reason for e in events if isinstance(e, Unhandled)] == [reason]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parser_never_raises_on_arbitrary_json(value: object) -> None:
    for event in whatsapp.parse(value):
        assert isinstance(event, InboundText | StatusUpdate | Unhandled)


@settings(max_examples=300, deadline=None)
@given(
    json_values.map(
        lambda v: {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "changes": [
                        {
                            "field": "messages",
                            "value": {
                                "metadata": {"phone_number_id": "1"},
                                "messages": v,
                                "statuses": v,
                            },
                        }
                    ]
                }
            ],
        }
    )
)
def test_parser_never_raises_inside_a_well_formed_envelope(value: object) -> None:
    whatsapp.parse(value)


def test_send_request_shape() -> None:
    path, body = whatsapp.build_text_send(
        phone_number_id="123", to="447700900000", text="hi", reply_to="wamid.X"
    )
    assert path == "123/messages"
    assert body == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "447700900000",
        "type": "text",
        "text": {"preview_url": False, "body": "hi"},
        "context": {"message_id": "wamid.X"},
    }
    assert whatsapp.sent_message_id({"messages": [{"id": "wamid.Y"}]}) == "wamid.Y"
    assert whatsapp.sent_message_id({"error": {}}) is None


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (429, {"error": {"code": 130429}}, "retry"),
        (503, None, "retry"),
        (400, {"error": {"code": 131056}}, "retry"),
        (401, {"error": {"code": 190}}, "credentials"),
        (400, {"error": {"code": 190}}, "credentials"),
        (400, {"error": {"code": 131047}}, "never"),
        (400, {"error": {"code": 100}}, "never"),
    ],
)
def test_error_classification(status: int, body: object, kind: str) -> None:
    assert whatsapp.classify_error(status, body) == kind


# --- signatures -------------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(
    body=st.binary(max_size=512),
    secret=st.text(min_size=1, max_size=40),
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_signature_verifies_exactly_the_hmac(body: bytes, secret: str, flip: int) -> None:
    header = meta.sign(body, secret)
    assert header == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert meta.verify_signature(body, header, ["other", secret]) == 1
    if body:
        i = flip % len(body)
        tampered = body[:i] + bytes([body[i] ^ (1 << (flip % 8))]) + body[i + 1 :]
        with pytest.raises(meta.SignatureError):
            meta.verify_signature(tampered, header, [secret])
    digits = header[7:]
    j = flip % 64
    wrong = digits[:j] + ("0" if digits[j] != "0" else "1") + digits[j + 1 :]
    with pytest.raises(meta.SignatureError) as err:
        meta.verify_signature(body, "sha256=" + wrong, [secret])
    assert err.value.missing is False


def test_signature_code_compares_in_constant_time() -> None:
    source = Path(meta.__file__).read_text()
    assert "compare_digest" in source
    assert "== given" not in source and "given ==" not in source


def test_uppercase_hex_is_accepted() -> None:
    body = b"{}"
    header = meta.sign(body, "s")
    assert meta.verify_signature(body, header.upper().replace("SHA256=", "sha256="), ["s"]) == 0


def test_handshake() -> None:
    ok = meta.Handshake("subscribe", "tok", "42")
    assert meta.answer_handshake(ok, ["x", "tok"]) == "42"
    for query, status in [
        (meta.Handshake("subscribe", "bad", "42"), 403),
        (meta.Handshake("subscribe", "", "42"), 403),
        (meta.Handshake("other", "tok", "42"), 403),
        (meta.Handshake("subscribe", "tok", None), 400),
    ]:
        with pytest.raises(meta.HandshakeError) as err:
            meta.answer_handshake(query, ["tok"])
        assert err.value.status == status
