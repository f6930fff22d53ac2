"""Pure pieces of outbound for all three channels: the Graph error table (one test per row of
meta-channels reference a.6), messaging types and tags, request builders, read/typing requests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from webhooks import repository
from webhooks.channels import instagram, messenger, meta, whatsapp
from webhooks.tasks import _Go, build_request, sent_message_id, typing_requests

# --- the Graph error table --------------------------------------------------------------------


def _body(code: int, subcode: int | None = None, error_type: str = "OAuthException") -> Any:
    error: dict[str, Any] = {"message": "(#x) text", "type": error_type, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": {**error, "fbtrace_id": "A1"}}


# (row of a.6, HTTP status Meta answers with, code, subcode, class)
ROWS = [
    ("0 AuthException", 401, 0, None, meta.CREDENTIALS),
    ("190 invalid token", 400, 190, None, meta.CREDENTIALS),
    ("190/463 expired token", 400, 190, 463, meta.CREDENTIALS),
    ("3 capability", 400, 3, None, meta.NEVER),
    ("10 permission", 403, 10, None, meta.NEVER),
    ("10/2018300 thread owned by another app", 400, 10, 2018300, meta.NEVER),
    ("200 permission", 403, 200, None, meta.NEVER),
    ("230 permission", 400, 230, None, meta.NEVER),
    ("299 permission", 400, 299, None, meta.NEVER),
    ("4 app rate limit", 429, 4, None, meta.RETRY),
    ("80007 WABA rate limit", 400, 80007, None, meta.RETRY),
    ("130429 throughput", 429, 130429, 2494055, meta.RETRY),
    ("131056 pair rate limit", 400, 131056, None, meta.RETRY),
    ("131048 spam rate limit", 400, 131048, None, meta.NEVER),
    ("131049 not delivered by Meta", 400, 131049, None, meta.NEVER),
    ("131047 re-engagement", 400, 131047, None, meta.NEVER),
    ("131026 undeliverable", 400, 131026, None, meta.NEVER),
    ("131051 unsupported type", 400, 131051, None, meta.NEVER),
    ("131060 unavailable", 400, 131060, None, meta.NEVER),
    ("131000 unknown", 500, 131000, None, meta.RETRY),
    ("1 unknown", 500, 1, None, meta.RETRY),
    ("2 temporary", 503, 2, None, meta.RETRY),
    ("368 policy block", 400, 368, None, meta.NEVER),
    ("131031 account locked", 400, 131031, None, meta.NEVER),
    ("551 person unavailable", 400, 551, None, meta.NEVER),
    ("613 Messenger rate limit", 400, 613, None, meta.RETRY),
    ("10/2018278 outside the window", 400, 10, 2018278, meta.NEVER),
]


@pytest.mark.parametrize(
    ("status", "code", "subcode", "kind"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_every_row_of_the_error_table(
    status: int, code: int, subcode: int | None, kind: str
) -> None:
    error_type = "AuthException" if code == 0 else "OAuthException"
    error = meta.classify_error(status, _body(code, subcode, error_type))
    assert (error.kind, error.code, error.subcode) == (kind, code, subcode)
    # The class follows the code, not the HTTP status: the same code under another status
    # lands in the same class (except the status-only fallbacks).
    assert meta.classify_error(400, _body(code, subcode, error_type)).kind == kind
    assert "(#x)" not in error.describe()


def test_account_wide_blocks_are_never_retried_and_raise_an_alert() -> None:
    for code in (368, 131031):
        error = meta.classify_error(400, _body(code))
        assert error.kind == meta.NEVER and error.alert
    assert not meta.classify_error(400, _body(131026)).alert


def test_code_zero_without_an_auth_type_and_unknown_codes_fall_back_to_the_status() -> None:
    assert meta.classify_error(400, _body(0, error_type="GraphMethodException")).kind == meta.NEVER
    assert meta.classify_error(401, _body(999999)).kind == meta.CREDENTIALS
    assert meta.classify_error(429, _body(999999)).kind == meta.RETRY
    assert meta.classify_error(502, None).kind == meta.RETRY
    assert meta.classify_error(400, _body(100)).kind == meta.NEVER
    assert meta.classify_error(400, "not json").kind == meta.NEVER


def test_the_table_and_the_code_sets_agree() -> None:
    for code, rule in meta.ERROR_TABLE.items():
        assert rule.kind in (meta.RETRY, meta.NEVER, meta.CREDENTIALS)
        assert (code in meta.RETRY_CODES) == (rule.kind == meta.RETRY)
        assert (code in meta.CREDENTIAL_CODES) == (rule.kind == meta.CREDENTIALS)
    assert meta.rule_for(250) is not None and meta.rule_for(300) is None
    assert meta.rule_for(None) is None


# --- messaging types --------------------------------------------------------------------------

H = timedelta(hours=1)


@pytest.mark.parametrize(
    ("kind", "is_reply", "since", "expected"),
    [
        ("text", True, 1 * H, ("RESPONSE", None)),
        ("text", True, 24 * H, ("RESPONSE", None)),
        ("text", False, 2 * H, ("UPDATE", None)),
        ("notice", False, 2 * H, ("UPDATE", None)),
        ("human", False, 2 * H, ("RESPONSE", None)),
        ("human", False, 25 * H, ("MESSAGE_TAG", "HUMAN_AGENT")),
        ("human", False, 7 * 24 * H, ("MESSAGE_TAG", "HUMAN_AGENT")),
        ("human", False, 7 * 24 * H + timedelta(seconds=1), None),
        ("text", True, 24 * H + timedelta(seconds=1), None),
        ("notice", False, 30 * H, None),
        ("text", True, None, None),
        ("text", True, -timedelta(seconds=5), ("RESPONSE", None)),
    ],
)
def test_messaging_type_and_tag(
    kind: str, is_reply: bool, since: timedelta | None, expected: tuple[str, str | None] | None
) -> None:
    assert messenger.messaging_for(kind=kind, is_reply=is_reply, since_user=since) == expected


def test_a_bot_message_never_carries_a_tag() -> None:
    for hours in range(0, 24 * 8, 3):
        for kind in ("text", "notice"):
            for is_reply in (True, False):
                got = messenger.messaging_for(kind=kind, is_reply=is_reply, since_user=hours * H)
                assert got is None or got[1] is None


# --- request builders -------------------------------------------------------------------------


def test_messenger_text_send() -> None:
    path, body = messenger.build_text_send(
        page_id="PAGE1", recipient="PSID1", text="hi", messaging_type="RESPONSE", metadata="7:0"
    )
    assert path == "PAGE1/messages"
    assert body == {
        "recipient": {"id": "PSID1"},
        "messaging_type": "RESPONSE",
        "message": {"text": "hi", "metadata": "7:0"},
    }
    _, tagged = messenger.build_text_send(
        page_id="PAGE1",
        recipient="PSID1",
        text="hi",
        messaging_type="MESSAGE_TAG",
        tag="HUMAN_AGENT",
    )
    assert tagged == {
        "recipient": {"id": "PSID1"},
        "messaging_type": "MESSAGE_TAG",
        "message": {"text": "hi"},
        "tag": "HUMAN_AGENT",
    }
    _, long_meta = messenger.build_text_send(
        page_id="P", recipient="R", text="t", messaging_type="UPDATE", metadata="m" * 5000
    )
    assert len(long_meta["message"]["metadata"]) < 1000


def test_instagram_text_send_has_no_correlation_field() -> None:
    path, body = instagram.build_text_send(
        account_id="IG1", recipient="IGSID1", text="hola", messaging_type="UPDATE"
    )
    assert path == "IG1/messages"
    assert body == {
        "recipient": {"id": "IGSID1"},
        "messaging_type": "UPDATE",
        "message": {"text": "hola"},
    }


def test_sender_actions_and_whatsapp_read_with_typing() -> None:
    assert messenger.build_sender_action(page_id="P", recipient="R", action="mark_seen") == (
        "P/messages",
        {"recipient": {"id": "R"}, "sender_action": "mark_seen"},
    )
    assert instagram.build_sender_action(account_id="IG", recipient="R", action="typing_on") == (
        "IG/messages",
        {"recipient": {"id": "R"}, "sender_action": "typing_on"},
    )
    with pytest.raises(ValueError, match="sender action"):
        messenger.build_sender_action(page_id="P", recipient="R", action="typing_maybe")
    assert whatsapp.build_mark_read(phone_number_id="PN", message_id="wamid.A", typing=True) == (
        "PN/messages",
        {
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": "wamid.A",
            "typing_indicator": {"type": "text"},
        },
    )
    assert whatsapp.build_mark_read(phone_number_id="PN", message_id="wamid.A")[1] == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": "wamid.A",
    }


def test_sent_ids_per_channel() -> None:
    assert sent_message_id("messenger", {"recipient_id": "R", "message_id": "m_1"}) == "m_1"
    assert sent_message_id("instagram", {"recipient_id": "R", "message_id": "m_2"}) == "m_2"
    assert sent_message_id("instagram", {"error": {}}) is None
    assert sent_message_id("whatsapp", {"messages": [{"id": "wamid.3"}]}) == "wamid.3"


def _outbound(channel: str, **extra: Any) -> repository.Outbound:
    values: dict[str, Any] = {
        "message_id": 7,
        "status": "pending",
        "kind": "text",
        "body": "x",
        "workspace_id": 1,
        "conversation_id": 2,
        "channel": channel,
        "account_id": 3,
        "account": "ACC",
        "account_status": "active",
        "access_token": "token",
        "recipient": "USER",
        "last_inbound_at": datetime.now(UTC),
        **extra,
    }
    return repository.Outbound(**values)


def _chunk(idx: int, body: str) -> repository.Chunk:
    return repository.Chunk(idx + 10, idx, 2, "sending", body, f"7:{idx}", 1, False, None)


def test_build_request_per_channel() -> None:
    wa = _outbound("whatsapp", reply_to_id=5, reply_to_provider_id="wamid.IN")
    _, first = build_request(wa, _chunk(0, "a"), _Go())
    _, second = build_request(wa, _chunk(1, "b"), _Go())
    assert first["context"] == {"message_id": "wamid.IN"}
    assert "context" not in second  # reply context on the first chunk only
    assert first["biz_opaque_callback_data"] == "7:0"
    path, body = build_request(_outbound("messenger"), _chunk(1, "b"), _Go(messaging_type="UPDATE"))
    assert (path, body) == (
        "ACC/messages",
        {
            "recipient": {"id": "USER"},
            "messaging_type": "UPDATE",
            "message": {"text": "b", "metadata": "7:1"},
        },
    )
    replying = _outbound("messenger", reply_to_id=5, reply_to_provider_id="m_IN")
    _, off = build_request(replying, _chunk(0, "a"), _Go())
    assert "reply_to" not in off  # unconfirmed shape: off by default
    _, on = build_request(replying, _chunk(0, "a"), _Go(), messenger_reply_context=True)
    assert on["reply_to"] == {"mid": "m_IN"}
    _, later = build_request(replying, _chunk(1, "b"), _Go(), messenger_reply_context=True)
    assert "reply_to" not in later
    path, body = build_request(
        _outbound("instagram", kind="human"),
        _chunk(0, "c"),
        _Go(messaging_type="MESSAGE_TAG", tag="HUMAN_AGENT"),
    )
    assert body == {
        "recipient": {"id": "USER"},
        "messaging_type": "MESSAGE_TAG",
        "message": {"text": "c"},
        "tag": "HUMAN_AGENT",
    }
    with pytest.raises(ValueError, match="no send API"):
        build_request(_outbound("telegram"), _chunk(0, "d"), _Go())


def _target(channel: str, provider_id: str | None = "mid.IN") -> repository.TypingTarget:
    return repository.TypingTarget(
        message_id=1,
        channel=channel,
        provider_message_id=provider_id,
        received_at=datetime.now(UTC),
        account_id=2,
        account="ACC",
        account_status="active",
        access_token="t",
        recipient="USER",
    )


def test_typing_requests_per_channel() -> None:
    assert typing_requests(_target("whatsapp", "wamid.IN"), typing=True) == [
        (
            "ACC/messages",
            {
                "messaging_product": "whatsapp",
                "status": "read",
                "message_id": "wamid.IN",
                "typing_indicator": {"type": "text"},
            },
        )
    ]
    assert typing_requests(_target("whatsapp", None), typing=True) == []
    for channel in ("messenger", "instagram"):
        assert [b["sender_action"] for _, b in typing_requests(_target(channel), typing=True)] == [
            "mark_seen",
            "typing_on",
        ]
        assert [b["sender_action"] for _, b in typing_requests(_target(channel), typing=False)] == [
            "mark_seen"
        ]
