"""WhatsApp Cloud API adapter: webhook payload → events, reply → send request, error → class.

Payload shape (``object: whatsapp_business_account``): ``entry[].changes[].value`` with
``metadata.phone_number_id``, ``contacts[]`` (matched to messages by ``wa_id``, never by
position), ``messages[]`` and ``statuses[]``. Every entry, change, message and status is read.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from webhooks.channels import meta
from webhooks.channels.events import Event, InboundText, StatusUpdate, Unhandled

CHANNEL = "whatsapp"
TEXT_LIMIT = 4096


def _ts(value: Any) -> datetime:
    try:
        return datetime.fromtimestamp(int(value), tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return datetime.now(UTC)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def parse(payload: Any) -> list[Event]:
    """Translate one webhook body (already JSON-decoded) into events. Never raises."""
    if not isinstance(payload, dict) or payload.get("object") != "whatsapp_business_account":
        return [Unhandled(CHANNEL, None, "unknown_object", payload)]
    entries = payload.get("entry")
    if not isinstance(entries, list):
        return [Unhandled(CHANNEL, None, "no_entries", payload)]
    events: list[Event] = []
    for entry in entries:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            events.append(Unhandled(CHANNEL, None, "malformed_entry", entry))
            continue
        for change in changes:
            events.extend(_parse_change(change))
    return events


def _parse_change(change: Any) -> list[Event]:
    if not isinstance(change, dict):
        return [Unhandled(CHANNEL, None, "malformed_change", change)]
    value = change.get("value")
    field_name = change.get("field")
    account = None
    if isinstance(value, dict) and isinstance(value.get("metadata"), dict):
        account = _str(value["metadata"].get("phone_number_id"))
    if field_name != "messages":
        return [Unhandled(CHANNEL, account, f"field:{field_name}", change)]
    if not isinstance(value, dict) or account is None:
        return [Unhandled(CHANNEL, account, "malformed_value", change)]
    for key in ("contacts", "messages", "statuses"):
        if key in value and not isinstance(value[key], list):
            return [Unhandled(CHANNEL, account, f"malformed_{key}", change)]
    names: dict[str, str | None] = {}
    for contact in _list(value.get("contacts")):
        if isinstance(contact, dict) and _str(contact.get("wa_id")):
            profile = contact.get("profile")
            names[contact["wa_id"]] = (
                _str(profile.get("name")) if isinstance(profile, dict) else None
            )
    events: list[Event] = []
    for message in _list(value.get("messages")):
        events.append(_parse_message(account, message, names))
    for status in _list(value.get("statuses")):
        events.append(_parse_status(account, status))
    if not events:
        events.append(Unhandled(CHANNEL, account, "empty_change", change))
    return events


def _parse_message(account: str, message: Any, names: dict[str, str | None]) -> Event:
    if not isinstance(message, dict):
        return Unhandled(CHANNEL, account, "malformed_message", message)
    sender, message_id = _str(message.get("from")), _str(message.get("id"))
    if sender is None or message_id is None:
        return Unhandled(CHANNEL, account, "malformed_message", message)
    kind = message.get("type")
    text = message.get("text")
    if kind == "text" and isinstance(text, dict) and isinstance(text.get("body"), str):
        context = message.get("context")
        return InboundText(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            contact_name=names.get(sender),
            message_id=message_id,
            timestamp=_ts(message.get("timestamp")),
            text=text["body"],
            reply_to=_str(context.get("id")) if isinstance(context, dict) else None,
        )
    return Unhandled(CHANNEL, account, f"message_type:{kind}", message)


def _parse_status(account: str, status: Any) -> Event:
    if not isinstance(status, dict):
        return Unhandled(CHANNEL, account, "malformed_status", status)
    message_id, state = _str(status.get("id")), _str(status.get("status"))
    if message_id is None or state is None:
        return Unhandled(CHANNEL, account, "malformed_status", status)
    code = None
    errors = status.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        raw_code = errors[0].get("code")
        code = raw_code if isinstance(raw_code, int) else None
    return StatusUpdate(
        channel=CHANNEL,
        account_id=account,
        message_id=message_id,
        status=state,
        timestamp=_ts(status.get("timestamp")),
        error_code=code,
        callback_data=_str(status.get("biz_opaque_callback_data")),
    )


def build_text_send(
    *,
    phone_number_id: str,
    to: str,
    text: str,
    reply_to: str | None = None,
    callback_data: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The Graph API path (after the version) and JSON body for one text message.

    ``callback_data`` goes out as ``biz_opaque_callback_data`` (at most 512 characters) and
    comes back in every status webhook of that message: it is how a send whose answer was lost
    is recognised."""
    body: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"preview_url": False, "body": text},
    }
    if reply_to:
        body["context"] = {"message_id": reply_to}
    if callback_data:
        body["biz_opaque_callback_data"] = callback_data[:512]
    return f"{phone_number_id}/messages", body


def sent_message_id(response: Any) -> str | None:
    """The ``wamid`` from a successful send response, if the response has Meta's shape."""
    if isinstance(response, dict):
        messages = response.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            return _str(messages[0].get("id"))
    return None


class SendErrorClass:
    RETRY = meta.RETRY
    NEVER = meta.NEVER
    CREDENTIALS = meta.CREDENTIALS


def classify_error(status: int, response: Any) -> str:
    """Whether a failed send may be retried: ``retry``, ``never`` or ``credentials``."""
    return meta.classify_error(status, response).kind
