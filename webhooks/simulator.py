"""Webhook deliveries exactly as Meta sends them: used by ``parley chat`` and the tests.

Meta serializes with escaped unicode (``\\u00e9``) and signs those raw bytes with the app secret.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from webhooks.channels.meta import sign


def new_wamid() -> str:
    return "wamid.HBgL" + secrets.token_hex(16).upper()


def new_mid(channel: str) -> str:
    """A fresh message id in the style of ``channel`` (Messenger ``m_…``, Instagram base64)."""
    if channel == "whatsapp":
        return new_wamid()
    if channel == "instagram":
        return "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOj" + secrets.token_hex(30)
    return "m_" + secrets.token_urlsafe(48)


def _whatsapp_value(phone_number_id: str, display_phone_number: str, **rest: Any) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": display_phone_number,
            "phone_number_id": phone_number_id,
        },
        **rest,
    }


def _whatsapp_delivery(value: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA_ID", "changes": [{"field": field, "value": value}]}],
    }


def whatsapp_message(
    *,
    phone_number_id: str,
    wa_id: str,
    type: str,  # noqa: A002  # Meta's field name
    content: dict[str, Any],
    name: str = "Test User",
    message_id: str | None = None,
    timestamp: int | None = None,
    display_phone_number: str = "15550000000",
    context: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One inbound WhatsApp message of ``type`` whose object (``content``) sits under that key;
    ``context`` (``{"from", "id"}``) when it replies to an earlier message."""
    message: dict[str, Any] = {
        "from": wa_id,
        "id": message_id or new_wamid(),
        "timestamp": str(timestamp or int(time.time())),
        "type": type,
        type: content,
    }
    if context is not None:
        message["context"] = context
    value = _whatsapp_value(
        phone_number_id,
        display_phone_number,
        contacts=[{"profile": {"name": name}, "wa_id": wa_id}],
        messages=[message],
    )
    return _whatsapp_delivery(value)


def whatsapp_text(
    *,
    phone_number_id: str,
    wa_id: str,
    text: str,
    name: str = "Test User",
    message_id: str | None = None,
    timestamp: int | None = None,
    display_phone_number: str = "15550000000",
    context: dict[str, str] | None = None,
) -> dict[str, Any]:
    return whatsapp_message(
        phone_number_id=phone_number_id,
        wa_id=wa_id,
        type="text",
        content={"body": text},
        name=name,
        message_id=message_id,
        timestamp=timestamp,
        display_phone_number=display_phone_number,
        context=context,
    )


def whatsapp_image(
    *,
    phone_number_id: str,
    wa_id: str,
    media_id: str,
    sha256: str,
    mime_type: str = "image/jpeg",
    caption: str | None = None,
    name: str = "Test User",
    message_id: str | None = None,
    timestamp: int | None = None,
    display_phone_number: str = "15550000000",
) -> dict[str, Any]:
    """An image message: Meta names an uploaded media ``id`` (fetched later with the token) and
    gives its base64 ``sha256``."""
    image: dict[str, Any] = {}
    if caption is not None:
        image["caption"] = caption
    image.update({"mime_type": mime_type, "sha256": sha256, "id": media_id})
    return whatsapp_message(
        phone_number_id=phone_number_id,
        wa_id=wa_id,
        type="image",
        content=image,
        name=name,
        message_id=message_id,
        timestamp=timestamp,
        display_phone_number=display_phone_number,
    )


def whatsapp_reaction(
    *,
    phone_number_id: str,
    wa_id: str,
    target_message_id: str,
    emoji: str,
    name: str = "Test User",
    message_id: str | None = None,
    timestamp: int | None = None,
    display_phone_number: str = "15550000000",
) -> dict[str, Any]:
    """A reaction to ``target_message_id``; an empty ``emoji`` removes it (as Meta sends)."""
    return whatsapp_message(
        phone_number_id=phone_number_id,
        wa_id=wa_id,
        type="reaction",
        content={"message_id": target_message_id, "emoji": emoji},
        name=name,
        message_id=message_id,
        timestamp=timestamp,
        display_phone_number=display_phone_number,
    )


def whatsapp_revoke(
    *,
    phone_number_id: str,
    wa_id: str,
    original_message_id: str,
    name: str = "Test User",
    message_id: str | None = None,
    timestamp: int | None = None,
    display_phone_number: str = "15550000000",
) -> dict[str, Any]:
    """The user deleted ``original_message_id`` for everyone."""
    return whatsapp_message(
        phone_number_id=phone_number_id,
        wa_id=wa_id,
        type="revoke",
        content={"original_message_id": original_message_id},
        name=name,
        message_id=message_id,
        timestamp=timestamp,
        display_phone_number=display_phone_number,
    )


def whatsapp_user_preferences(
    *,
    phone_number_id: str,
    wa_id: str,
    value: str = "stop",
    category: str = "marketing_messages",
    detail: str | None = None,
    timestamp: int | None = None,
    display_phone_number: str = "15550000000",
) -> dict[str, Any]:
    """A ``user_preferences`` change: the user stopped (or resumed) marketing messages."""
    verb = "stop" if value == "stop" else "resume"
    preference = {
        "wa_id": wa_id,
        "detail": detail or f"User requested to {verb} marketing messages",
        "category": category,
        "value": value,
        "timestamp": timestamp or int(time.time()),
    }
    delivery = _whatsapp_value(
        phone_number_id,
        display_phone_number,
        contacts=[{"wa_id": wa_id}],
        user_preferences=[preference],
    )
    return _whatsapp_delivery(delivery, "user_preferences")


# --- Messenger (``object: page``) and Instagram (``object: instagram``) -----------------------

PAGE_OBJECTS = {"messenger": "page", "instagram": "instagram"}

# Messenger/Instagram name a reaction besides its emoji; anything else is ``other``.
REACTION_NAMES = {
    "\u2764\ufe0f": "love",
    "\u2764": "love",
    "\U0001f44d": "like",
    "\U0001f606": "smile",
    "\U0001f602": "smile",
    "\U0001f62e": "wow",
    "\U0001f622": "sad",
    "\U0001f620": "angry",
}


def _now_ms() -> int:
    return int(time.time() * 1000)


def page_event(
    *,
    channel: str,
    account: str,
    user: str,
    key: str,
    body: dict[str, Any],
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """One ``entry[].messaging[]`` event from ``user`` to the page / IG account ``account``."""
    if channel not in PAGE_OBJECTS:
        raise ValueError(f"not a page channel: {channel!r}")
    ms = timestamp_ms or _now_ms()
    return {
        "object": PAGE_OBJECTS[channel],
        "entry": [
            {
                "id": account,
                "time": ms,
                "messaging": [
                    {
                        "sender": {"id": user},
                        "recipient": {"id": account},
                        "timestamp": ms,
                        key: body,
                    }
                ],
            }
        ],
    }


def page_text(
    *,
    channel: str,
    account: str,
    user: str,
    text: str,
    mid: str | None = None,
    reply_to: str | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"mid": mid or new_mid(channel), "text": text}
    if reply_to is not None:
        message["reply_to"] = {"mid": reply_to}
    return page_event(
        channel=channel,
        account=account,
        user=user,
        key="message",
        body=message,
        timestamp_ms=timestamp_ms,
    )


def page_attachment(
    *,
    channel: str,
    account: str,
    user: str,
    url: str,
    kind: str = "image",
    text: str | None = None,
    mid: str | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """A message with one attachment (``kind``) that Meta serves from the CDN ``url``."""
    message: dict[str, Any] = {"mid": mid or new_mid(channel)}
    if text is not None:
        message["text"] = text
    message["attachments"] = [{"type": kind, "payload": {"url": url}}]
    return page_event(
        channel=channel,
        account=account,
        user=user,
        key="message",
        body=message,
        timestamp_ms=timestamp_ms,
    )


def page_reaction(
    *,
    channel: str,
    account: str,
    user: str,
    target_mid: str,
    emoji: str | None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """A reaction to ``target_mid``; ``emoji=None`` (or empty) removes it (``unreact``)."""
    body: dict[str, Any]
    if emoji:
        body = {
            "reaction": REACTION_NAMES.get(emoji, "other"),
            "emoji": emoji,
            "action": "react",
            "mid": target_mid,
        }
    else:
        body = {"action": "unreact", "mid": target_mid}
    return page_event(
        channel=channel,
        account=account,
        user=user,
        key="reaction",
        body=body,
        timestamp_ms=timestamp_ms,
    )


def page_delete(
    *, channel: str, account: str, user: str, mid: str, timestamp_ms: int | None = None
) -> dict[str, Any]:
    """The user unsent ``mid`` (Instagram ``is_deleted``). Messenger has no unsend event."""
    if channel != "instagram":
        raise ValueError("only Instagram reports an unsent message; Messenger has no unsend")
    return page_event(
        channel=channel,
        account=account,
        user=user,
        key="message",
        body={"mid": mid, "is_deleted": True},
        timestamp_ms=timestamp_ms,
    )


def encode(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()


def signed(payload: Any, secret: str) -> tuple[bytes, dict[str, str]]:
    body = encode(payload)
    return body, {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, secret)}


def whatsapp_status(
    *,
    phone_number_id: str,
    message_id: str,
    status: str,
    recipient_id: str,
    callback_data: str | None = None,
    timestamp: int | None = None,
    error_code: int | None = None,
    display_phone_number: str = "15550000000",
) -> dict[str, Any]:
    """A ``statuses`` webhook for one outbound message, as Meta sends it."""
    item: dict[str, Any] = {
        "id": message_id,
        "status": status,
        "timestamp": str(timestamp or int(time.time())),
        "recipient_id": recipient_id,
    }
    if status in ("sent", "delivered"):
        item["conversation"] = {"id": secrets.token_hex(16), "origin": {"type": "service"}}
        item["pricing"] = {"billable": False, "pricing_model": "PMP", "category": "service"}
    if callback_data is not None:
        item["biz_opaque_callback_data"] = callback_data
    if error_code is not None:
        item["errors"] = [{"code": error_code, "title": "Message failed to send"}]
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "WABA_ID",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": display_phone_number,
                                "phone_number_id": phone_number_id,
                            },
                            "statuses": [item],
                        },
                    }
                ],
            }
        ],
    }
