"""WhatsApp Cloud API adapter: webhook payload → events, reply → send request, error → class.

Payload shape (``object: whatsapp_business_account``): ``entry[].changes[]`` with a ``field`` and
a ``value``. For ``field: messages`` the value has ``metadata.phone_number_id``, ``contacts[]``
(matched to messages by ``wa_id``, never by position), ``messages[]``, ``statuses[]`` and
``errors[]``; ``user_preferences`` and ``message_template_status_update`` have their own values;
every other field is acknowledged and recorded as ``Unhandled("field:<name>")``. Every entry,
change, message and status is read, and a malformed one never hides the others.

``parse_events`` returns every kind of :data:`~webhooks.channels.events.ChannelEvent`.
``parse`` is the view the intake service consumes today: the same walk, with every kind other
than text and statuses reported as ``Unhandled`` under its earlier reason
(``message_type:<type>``, ``field:<name>``) and its raw message or change.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from webhooks.channels import meta
from webhooks.channels.events import (
    PAYLOAD_MAX,
    TEXT_MAX,
    URL_MAX,
    ChannelEvent,
    Event,
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
    label,
    read_dict,
    read_flag,
    read_float,
    read_id,
    read_int,
    read_list,
    read_str,
    read_time,
)

CHANNEL = "whatsapp"
TEXT_LIMIT = 4096
MEDIA_TYPES = ("image", "video", "audio", "document", "sticker")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_events(payload: Any) -> list[ChannelEvent]:
    """Translate one webhook body (already JSON-decoded) into events. Never raises."""
    events: list[ChannelEvent] = []
    for item in _changes(payload):
        if isinstance(item, Unhandled):
            events.append(item)
            continue
        waba_id, entry_time, change = item
        field_name = change.get("field")
        if field_name == "messages":
            events.extend(event for event, _ in _messages_change(change))
        elif field_name == "user_preferences":
            events.extend(_user_preferences(change))
        elif field_name == "message_template_status_update":
            events.append(_template_status(waba_id, entry_time, change))
        else:
            events.append(_other_field(change))
    return events


def parse(payload: Any) -> list[Event]:
    """The intake service's view of :func:`parse_events` (text, statuses, the rest Unhandled).
    Never raises."""
    events: list[Event] = []
    for item in _changes(payload):
        if isinstance(item, Unhandled):
            events.append(item)
            continue
        _, _, change = item
        if change.get("field") != "messages":
            events.append(_other_field(change))
            continue
        for event, source in _messages_change(change):
            if isinstance(event, InboundText | StatusUpdate | Unhandled):
                events.append(event)
            else:
                kind = label(read_dict(source).get("type"))
                events.append(Unhandled(CHANNEL, event.account_id, f"message_type:{kind}", source))
    return events


# --- envelope ---------------------------------------------------------------------------------


def _changes(
    payload: Any,
) -> Iterator[Unhandled | tuple[str | None, datetime | None, dict[str, Any]]]:
    """Every change of every entry, with its entry's WABA id and time, or an Unhandled for a
    shape that is not one."""
    if not isinstance(payload, dict) or payload.get("object") != "whatsapp_business_account":
        yield Unhandled(CHANNEL, None, "unknown_object", payload)
        return
    entries = payload.get("entry")
    if not isinstance(entries, list):
        yield Unhandled(CHANNEL, None, "no_entries", payload)
        return
    for entry in entries:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            yield Unhandled(CHANNEL, None, "malformed_entry", entry)
            continue
        waba_id = read_id(entry.get("id"))
        entry_time = read_time(entry.get("time"), millis=False)
        for change in changes:
            if isinstance(change, dict):
                yield waba_id, entry_time, change
            else:
                yield Unhandled(CHANNEL, None, "malformed_change", change)


def _phone_number_id(value: Any) -> str | None:
    return read_id(read_dict(read_dict(value).get("metadata")).get("phone_number_id"))


def _other_field(change: dict[str, Any]) -> Unhandled:
    account = _phone_number_id(change.get("value"))
    return Unhandled(CHANNEL, account, f"field:{label(change.get('field'))}", change)


# --- field: messages --------------------------------------------------------------------------


def _messages_change(change: dict[str, Any]) -> list[tuple[ChannelEvent, Any]]:
    """The events of one ``messages`` change, each with the raw object it was read from."""
    value = change.get("value")
    account = _phone_number_id(value)
    if not isinstance(value, dict) or account is None:
        return [(Unhandled(CHANNEL, account, "malformed_value", change), change)]
    for key in ("contacts", "messages", "statuses", "errors"):
        if key in value and not isinstance(value[key], list):
            return [(Unhandled(CHANNEL, account, f"malformed_{key}", change), change)]
    names: dict[str, str | None] = {}
    for contact in read_list(value.get("contacts")):
        wa_id = read_id(read_dict(contact).get("wa_id"))
        if wa_id is not None:
            names[wa_id] = read_str(read_dict(contact.get("profile")).get("name"))
    events: list[tuple[ChannelEvent, Any]] = []
    for message in read_list(value.get("messages")):
        events.append((_message(account, message, names), message))
    for status in read_list(value.get("statuses")):
        events.append((_status(account, status), status))
    errors = read_list(value.get("errors"))
    if errors:
        # Out-of-band errors about the number or the webhook itself, not about one message.
        events.append((Unhandled(CHANNEL, account, "errors", errors), errors))
    if not events:
        events.append((Unhandled(CHANNEL, account, "empty_change", change), change))
    return events


def _message(account: str, message: Any, names: dict[str, str | None]) -> ChannelEvent:
    if not isinstance(message, dict):
        return Unhandled(CHANNEL, account, "malformed_message", message)
    sender, message_id = read_id(message.get("from")), read_id(message.get("id"))
    when = read_time(message.get("timestamp"), millis=False)
    if sender is None or message_id is None or when is None:
        return Unhandled(CHANNEL, account, "malformed_message", message)
    kind = message.get("type")
    body = read_dict(message.get(kind)) if isinstance(kind, str) else {}
    context = read_dict(message.get("context"))
    name = names.get(sender)
    reply_to = read_id(context.get("id"))
    forwarded = read_flag(context.get("forwarded"))
    frequently = read_flag(context.get("frequently_forwarded"))
    referral = _referral(message.get("referral"))
    malformed = Unhandled(CHANNEL, account, "malformed_message", message)

    if kind == "text":
        text = read_str(body.get("body"), TEXT_MAX)
        if text is None:
            return malformed
        return InboundText(
            CHANNEL,
            account,
            sender,
            name,
            message_id,
            when,
            text,
            reply_to=reply_to,
            forwarded=forwarded,
            frequently_forwarded=frequently,
            referral=referral,
        )
    if kind in MEDIA_TYPES:
        media = _media(kind, body)
        if media is None:
            return malformed
        return InboundMedia(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            contact_name=name,
            message_id=message_id,
            timestamp=when,
            media=(media,),
            caption=read_str(body.get("caption"), TEXT_MAX),
            reply_to=reply_to,
            forwarded=forwarded,
            frequently_forwarded=frequently,
            referral=referral,
        )
    if kind == "location":
        latitude = read_float(body.get("latitude"), 90.0)
        longitude = read_float(body.get("longitude"), 180.0)
        if latitude is None or longitude is None:
            return malformed
        return InboundLocation(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            contact_name=name,
            message_id=message_id,
            timestamp=when,
            latitude=latitude,
            longitude=longitude,
            name=read_str(body.get("name")),
            address=read_str(body.get("address")),
            url=read_str(body.get("url"), URL_MAX),
            reply_to=reply_to,
            forwarded=forwarded,
            frequently_forwarded=frequently,
            referral=referral,
        )
    if kind == "contacts":
        cards = tuple(
            card for card in map(_shared_contact, read_list(message.get("contacts"))) if card
        )
        if not cards:
            return malformed
        return InboundContacts(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            contact_name=name,
            message_id=message_id,
            timestamp=when,
            contacts=cards,
            reply_to=reply_to,
            forwarded=forwarded,
            frequently_forwarded=frequently,
            referral=referral,
        )
    if kind in ("interactive", "button"):
        if kind == "button":
            choice, payload, title, description = (
                "template_button",
                read_str(body.get("payload"), PAYLOAD_MAX),
                read_str(body.get("text")),
                None,
            )
        else:
            sub = body.get("type")
            if not isinstance(sub, str) or sub not in ("button_reply", "list_reply"):
                return Unhandled(
                    CHANNEL, account, f"message_type:interactive:{label(sub)}", message
                )
            choice = sub
            reply = read_dict(body.get(choice))
            payload = read_str(reply.get("id"), PAYLOAD_MAX)
            title = read_str(reply.get("title"))
            description = read_str(reply.get("description"))
        if payload is None:
            return malformed
        return InboundChoice(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            contact_name=name,
            message_id=message_id,
            timestamp=when,
            kind=choice,
            payload=payload,
            title=title,
            description=description,
            reply_to=reply_to,
            referral=referral,
        )
    if kind == "reaction":
        target = read_id(body.get("message_id"))
        if target is None:
            return malformed
        emoji = read_str(body.get("emoji"))
        return Reaction(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            target_message_id=target,
            timestamp=when,
            emoji=emoji,
            removed=emoji is None,
            message_id=message_id,
        )
    if kind == "edit":
        original = read_id(body.get("original_message_id"))
        edited = read_dict(body.get("message"))
        new_kind = edited.get("type")
        new_body = read_dict(edited.get(new_kind)) if isinstance(new_kind, str) else {}
        if new_kind == "text":
            text, media = read_str(new_body.get("body"), TEXT_MAX), None
        elif new_kind in MEDIA_TYPES:
            text, media = read_str(new_body.get("caption"), TEXT_MAX), _media(new_kind, new_body)
        else:
            text, media = None, None
        if original is None or (text is None and media is None):
            return malformed
        return MessageEdited(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            original_message_id=original,
            timestamp=when,
            text=text,
            media=(media,) if media else (),
            message_id=message_id,
        )
    if kind == "revoke":
        original = read_id(body.get("original_message_id"))
        if original is None:
            return malformed
        return MessageDeleted(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            original_message_id=original,
            timestamp=when,
            message_id=message_id,
        )
    if kind in ("unsupported", "unknown"):
        codes = (read_int(read_dict(e).get("code")) for e in read_list(message.get("errors")))
        return InboundUnsupported(
            channel=CHANNEL,
            account_id=account,
            contact_id=sender,
            contact_name=name,
            message_id=message_id,
            timestamp=when,
            error_codes=tuple(code for code in codes if code is not None),
            unsupported_type=read_str(body.get("type")),
        )
    return Unhandled(CHANNEL, account, f"message_type:{label(kind)}", message)


def _media(kind: str, body: dict[str, Any]) -> Media | None:
    media_id = read_id(body.get("id"))
    if media_id is None:
        return None
    return Media(
        kind=kind,
        media_id=media_id,
        url=read_str(body.get("url"), URL_MAX),
        mime_type=read_str(body.get("mime_type")),
        sha256=read_str(body.get("sha256")),
        filename=read_str(body.get("filename")),
        voice=read_flag(body.get("voice")),
        animated=read_flag(body.get("animated")),
    )


def _shared_contact(card: Any) -> SharedContact | None:
    card = read_dict(card)
    name = read_dict(card.get("name"))
    full = read_str(name.get("formatted_name")) or " ".join(
        part for part in (read_str(name.get("first_name")), read_str(name.get("last_name"))) if part
    )
    phones = tuple(
        SharedPhone(
            phone=read_str(phone.get("phone")),
            wa_id=read_id(phone.get("wa_id")),
            type=read_str(phone.get("type")),
        )
        for phone in map(read_dict, read_list(card.get("phones")))
        if read_str(phone.get("phone")) or read_id(phone.get("wa_id"))
    )
    emails = tuple(
        email
        for email in (read_str(read_dict(e).get("email")) for e in read_list(card.get("emails")))
        if email
    )
    organization = read_str(read_dict(card.get("org")).get("company"))
    if not (full or phones or emails):
        return None
    return SharedContact(name=full or None, phones=phones, emails=emails, organization=organization)


def _referral(value: Any) -> Referral | None:
    """Click-to-WhatsApp ad metadata carried by the first message of a conversation."""
    if not isinstance(value, dict):
        return None
    referral = Referral(
        source=read_str(value.get("source_type")),
        source_id=read_id(value.get("source_id")),
        source_url=read_str(value.get("source_url"), URL_MAX),
        headline=read_str(value.get("headline")),
        body=read_str(value.get("body"), TEXT_MAX),
        media_type=read_str(value.get("media_type")),
        image_url=read_str(value.get("image_url"), URL_MAX),
        video_url=read_str(value.get("video_url"), URL_MAX),
        thumbnail_url=read_str(value.get("thumbnail_url"), URL_MAX),
        ctwa_clid=read_str(value.get("ctwa_clid"), PAYLOAD_MAX),
    )
    return None if referral == Referral() else referral


def _status(account: str, status: Any) -> Event:
    if not isinstance(status, dict):
        return Unhandled(CHANNEL, account, "malformed_status", status)
    message_id, state = read_id(status.get("id")), read_str(status.get("status"), 32)
    when = read_time(status.get("timestamp"), millis=False)
    if message_id is None or state is None or when is None:
        return Unhandled(CHANNEL, account, "malformed_status", status)
    errors = read_list(status.get("errors"))
    return StatusUpdate(
        channel=CHANNEL,
        account_id=account,
        message_id=message_id,
        status=state,
        timestamp=when,
        error_code=read_int(read_dict(errors[0]).get("code")) if errors else None,
        callback_data=read_str(status.get("biz_opaque_callback_data"), PAYLOAD_MAX),
    )


# --- other fields -----------------------------------------------------------------------------


def _user_preferences(change: dict[str, Any]) -> list[ChannelEvent]:
    """Marketing-message stop / resume, one event per preference."""
    value = change.get("value")
    account = _phone_number_id(value)
    preferences = read_dict(value).get("user_preferences")
    if account is None or not isinstance(preferences, list) or not preferences:
        return [Unhandled(CHANNEL, account, "field:user_preferences", change)]
    events: list[ChannelEvent] = []
    for item in preferences:
        preference = read_dict(item)
        contact = read_id(preference.get("wa_id"))
        when = read_time(preference.get("timestamp"), millis=False)
        choice = preference.get("value")
        if contact is None or when is None or choice not in ("stop", "resume"):
            events.append(Unhandled(CHANNEL, account, "malformed_user_preference", item))
            continue
        events.append(
            MarketingPreference(
                channel=CHANNEL,
                account_id=account,
                contact_id=contact,
                timestamp=when,
                value=choice,
                category=read_str(preference.get("category")),
                detail=read_str(preference.get("detail")),
            )
        )
    return events


def _template_status(
    waba_id: str | None, entry_time: datetime | None, change: dict[str, Any]
) -> ChannelEvent:
    value = read_dict(change.get("value"))
    name = read_str(value.get("message_template_name"))
    status = read_str(value.get("event"), 64)
    if waba_id is None or name is None or status is None:
        return Unhandled(CHANNEL, waba_id, "field:message_template_status_update", change)
    return TemplateStatus(
        channel=CHANNEL,
        account_id=waba_id,
        name=name,
        status=status,
        language=read_str(value.get("message_template_language"), 64),
        template_id=read_id(value.get("message_template_id")),
        reason=read_str(value.get("reason")),
        timestamp=entry_time,
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


def build_template_send(
    *,
    phone_number_id: str,
    to: str,
    name: str,
    language: str,
    parameters: Sequence[str] = (),
    callback_data: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The Graph API path and JSON body for a template message (the only kind WhatsApp
    delivers outside the 24-hour window); ``parameters`` fill the body's {{1}}, {{2}}, …"""
    template: dict[str, Any] = {"name": name, "language": {"code": language}}
    if parameters:
        template["components"] = [
            {"type": "body", "parameters": [{"type": "text", "text": p} for p in parameters]}
        ]
    body: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "template",
        "template": template,
    }
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


def build_mark_read(
    *, phone_number_id: str, message_id: str, typing: bool = False
) -> tuple[str, dict[str, Any]]:
    """Mark an inbound message (and every earlier one) read; with ``typing`` also show the typing
    indicator, which WhatsApp dismisses on the reply or after 25 s. Answer: ``{"success": true}``.
    """
    body: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": message_id,
    }
    if typing:
        body["typing_indicator"] = {"type": "text"}
    return f"{phone_number_id}/messages", body
