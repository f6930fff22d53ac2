"""Messenger adapter (pure): webhook payload → events.

Payload shape (``object: page``): ``entry[]`` with the Page ``id`` and ``messaging[]`` — events
for the app that controls the thread — and ``standby[]`` — the same events for apps that do not
(handover protocol / conversation routing). Each event is ``{sender, recipient, timestamp, <key>}``
with one key: ``message`` (text, attachments, quick reply, echo), ``message_edit``, ``postback``,
``reaction``, ``read``, ``delivery``, ``referral``, ``optin``, ``pass_thread_control``,
``take_thread_control`` or ``request_thread_control``; other keys and ``changes[]`` (Page feed
fields) are acknowledged and recorded as ``Unhandled``. Every entry and event of both lists is
read; events from ``standby[]`` carry ``standby=True`` and never trigger a reply.

Instagram uses the same envelope (``object: instagram``, the IG account id as ``entry.id``) and
the same event shapes plus a few of its own (story replies and mentions, ``is_deleted``,
``is_unsupported``, ``read.mid``); :func:`parse_page` reads both, ``instagram.parse`` calls it.

In echoes the sender is the Page and the recipient the user: ``contact_id`` is always the user.
Timestamps are milliseconds. Postbacks from before Graph API v11 carry no ``mid``; their
``message_id`` is ``postback:<sender>:<timestamp>`` so a redelivery still de-duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from webhooks.channels.events import (
    PAYLOAD_MAX,
    TEXT_MAX,
    URL_MAX,
    ChannelEvent,
    DeliveryReceipt,
    Handover,
    InboundChoice,
    InboundLocation,
    InboundMedia,
    InboundReferral,
    InboundStoryMention,
    InboundStoryReply,
    InboundText,
    InboundUnsupported,
    Media,
    MessageDeleted,
    MessageEcho,
    MessageEdited,
    OptIn,
    Reaction,
    ReadReceipt,
    Referral,
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

CHANNEL = "messenger"
OBJECT = "page"

HANDOVER = ("pass_thread_control", "take_thread_control", "request_thread_control")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ENVELOPE = frozenset({"sender", "recipient", "timestamp"})
# Attachment types under a name of our own; the rest keep Meta's name (see Media.kind).
_KINDS = {"file": "document"}


def parse(payload: Any) -> list[ChannelEvent]:
    """Translate one Messenger webhook body (already JSON-decoded) into events. Never raises."""
    return parse_page(payload, channel=CHANNEL, obj=OBJECT)


def parse_page(payload: Any, *, channel: str, obj: str) -> list[ChannelEvent]:
    """Read a Page-style envelope (Messenger ``page`` or ``instagram``). Never raises."""
    if not isinstance(payload, dict) or payload.get("object") != obj:
        return [Unhandled(channel, None, "unknown_object", payload)]
    entries = payload.get("entry")
    if not isinstance(entries, list):
        return [Unhandled(channel, None, "no_entries", payload)]
    events: list[ChannelEvent] = []
    for entry in entries:
        events.extend(_entry(channel, entry))
    return events


def _entry(channel: str, entry: Any) -> list[ChannelEvent]:
    account = read_id(entry.get("id")) if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or account is None:
        return [Unhandled(channel, None, "malformed_entry", entry)]
    events: list[ChannelEvent] = []
    for key, standby in (("messaging", False), ("standby", True)):
        if key not in entry:
            continue
        items = entry[key]
        if not isinstance(items, list):
            events.append(Unhandled(channel, account, f"malformed_{key}", entry))
            continue
        events.extend(_event(channel, account, item, standby=standby) for item in items)
    changes = entry.get("changes")
    if changes is not None and not isinstance(changes, list):
        events.append(Unhandled(channel, account, "malformed_changes", entry))
    for change in read_list(changes):
        # Page and Instagram fields outside messaging (feed, comments, mentions …).
        name = label(read_dict(change).get("field"))
        events.append(Unhandled(channel, account, f"field:{name}", change))
    if not events:
        events.append(Unhandled(channel, account, "empty_entry", entry))
    return events


def _event(channel: str, account: str, item: Any, *, standby: bool) -> ChannelEvent:
    if not isinstance(item, dict):
        return Unhandled(channel, account, "malformed_event", item)
    key = next((key for key in _EVENT_KEYS if key in item), None)
    if key is None:
        others = [name for name in item if name not in _ENVELOPE]
        return Unhandled(channel, account, f"event:{label(others[0] if others else None)}", item)
    body = item[key]
    when = read_time(item.get("timestamp"), millis=True)
    malformed = Unhandled(channel, account, "malformed_event", item)
    if not isinstance(body, dict) or when is None:
        return malformed
    sender = read_dict(item.get("sender"))
    echo = key == "message" and read_flag(body.get("is_echo"))
    user = read_id(read_dict(item.get("recipient")).get("id") if echo else sender.get("id"))
    if key in ("referral", "optin"):
        # Chat-plugin and checkbox-plugin users may be known only by a user_ref.
        user_ref = read_str(sender.get("user_ref"), PAYLOAD_MAX) or read_str(
            body.get("user_ref"), PAYLOAD_MAX
        )
        if user is None and user_ref is None:
            return malformed
        if key == "referral":
            event = _standalone_referral(channel, account, user, user_ref, when, body, standby)
            return event or malformed
        return _optin(channel, account, user, user_ref, when, body, standby)
    if user is None:
        return malformed
    return _READERS[key](channel, account, user, when, body, standby) or malformed


def _standalone_referral(
    channel: str,
    account: str,
    user: str | None,
    user_ref: str | None,
    when: datetime,
    body: dict[str, Any],
    standby: bool,
) -> ChannelEvent | None:
    referral = _referral(body)
    if referral is None:
        return None
    return InboundReferral(
        channel=channel,
        account_id=account,
        contact_id=user,
        timestamp=when,
        referral=referral,
        user_ref=user_ref,
        standby=standby,
    )


def _optin(
    channel: str,
    account: str,
    user: str | None,
    user_ref: str | None,
    when: datetime,
    body: dict[str, Any],
    standby: bool,
) -> ChannelEvent:
    return OptIn(
        channel=channel,
        account_id=account,
        contact_id=user,
        timestamp=when,
        type=read_str(body.get("type"), 64),
        payload=read_str(body.get("payload"), PAYLOAD_MAX),
        ref=read_str(body.get("ref"), PAYLOAD_MAX),
        user_ref=user_ref,
        title=read_str(body.get("title")),
        token=read_str(body.get("notification_messages_token"), PAYLOAD_MAX),
        token_expires_at=read_time(body.get("token_expiry_timestamp"), millis=True),
        notification_status=read_str(body.get("notification_messages_status"), 64),
        frequency=read_str(body.get("notification_messages_frequency"), 64),
        standby=standby,
    )


def _message(
    channel: str, account: str, user: str, when: datetime, body: dict[str, Any], standby: bool
) -> ChannelEvent | None:
    mid = read_id(body.get("mid"))
    if mid is None:
        return None
    text = read_str(body.get("text"), TEXT_MAX)
    reply = read_dict(body.get("reply_to"))
    reply_to = read_id(reply.get("mid"))
    referral = _referral(body.get("referral"))
    attachments = read_list(body.get("attachments"))
    media = tuple(item for item in map(_attachment, attachments) if item)
    if read_flag(body.get("is_deleted")):
        return MessageDeleted(
            channel=channel,
            account_id=account,
            contact_id=user,
            original_message_id=mid,
            timestamp=when,
            standby=standby,
        )
    if read_flag(body.get("is_echo")):
        return MessageEcho(
            channel=channel,
            account_id=account,
            contact_id=user,
            message_id=mid,
            timestamp=when,
            text=text,
            media=media,
            app_id=read_id(body.get("app_id")),
            metadata=read_str(body.get("metadata"), PAYLOAD_MAX),
            standby=standby,
        )
    if read_flag(body.get("is_unsupported")):
        return InboundUnsupported(
            channel=channel,
            account_id=account,
            contact_id=user,
            message_id=mid,
            timestamp=when,
            standby=standby,
        )
    quick_reply = read_str(read_dict(body.get("quick_reply")).get("payload"), PAYLOAD_MAX)
    if quick_reply is not None:
        return InboundChoice(
            channel=channel,
            account_id=account,
            contact_id=user,
            message_id=mid,
            timestamp=when,
            kind="quick_reply",
            payload=quick_reply,
            title=text,
            reply_to=reply_to,
            referral=referral,
            standby=standby,
        )
    story = reply.get("story")
    if isinstance(story, dict):
        if text is None and not media:
            return None
        return InboundStoryReply(
            channel=channel,
            account_id=account,
            contact_id=user,
            message_id=mid,
            timestamp=when,
            story_id=read_id(story.get("id")),
            story_url=read_str(story.get("url"), URL_MAX),
            text=text,
            media=media,
            standby=standby,
        )
    if media and all(item.kind == "story_mention" for item in media):
        return InboundStoryMention(
            channel=channel,
            account_id=account,
            contact_id=user,
            message_id=mid,
            timestamp=when,
            url=media[0].url,
            standby=standby,
        )
    if len(attachments) == 1 and not media:
        location = _location(read_dict(attachments[0]))
        if location is not None:
            return InboundLocation(
                channel=channel,
                account_id=account,
                contact_id=user,
                message_id=mid,
                timestamp=when,
                latitude=location[0],
                longitude=location[1],
                name=read_str(read_dict(attachments[0]).get("title")),
                url=read_str(read_dict(attachments[0]).get("url"), URL_MAX),
                reply_to=reply_to,
                referral=referral,
                standby=standby,
            )
    if media:
        return InboundMedia(
            channel=channel,
            account_id=account,
            contact_id=user,
            message_id=mid,
            timestamp=when,
            media=media,
            caption=text,
            reply_to=reply_to,
            referral=referral,
            standby=standby,
        )
    if text is not None:
        return InboundText(
            channel,
            account,
            user,
            None,
            mid,
            when,
            text,
            reply_to=reply_to,
            referral=referral,
            standby=standby,
        )
    return None


def _attachment(value: Any) -> Media | None:
    """One attachment with a URL (or, for templates in echoes, none); locations are not media."""
    attachment = read_dict(value)
    kind = attachment.get("type")
    if not isinstance(kind, str) or kind == "location" or label(kind) != kind:
        return None
    payload = read_dict(attachment.get("payload"))
    url = read_str(payload.get("url"), URL_MAX) or read_str(attachment.get("url"), URL_MAX)
    if url is None and kind != "template":
        return None
    if kind == "image" and read_id(payload.get("sticker_id")) is not None:
        kind = "sticker"
    return Media(
        kind=_KINDS.get(kind, kind),
        url=url,
    )


def _location(attachment: dict[str, Any]) -> tuple[float, float] | None:
    if attachment.get("type") != "location":
        return None
    coordinates = read_dict(read_dict(attachment.get("payload")).get("coordinates"))
    latitude = read_float(coordinates.get("lat"), 90.0)
    longitude = read_float(coordinates.get("long"), 180.0)
    if latitude is None or longitude is None:
        return None
    return latitude, longitude


def _message_edit(
    channel: str, account: str, user: str, when: datetime, body: dict[str, Any], standby: bool
) -> ChannelEvent | None:
    mid = read_id(body.get("mid"))
    text = read_str(body.get("text"), TEXT_MAX)
    if mid is None or text is None:
        return None
    return MessageEdited(
        channel=channel,
        account_id=account,
        contact_id=user,
        original_message_id=mid,
        timestamp=when,
        text=text,
        edit_count=read_int(body.get("num_edit")),
        standby=standby,
    )


def _postback(
    channel: str, account: str, user: str, when: datetime, body: dict[str, Any], standby: bool
) -> ChannelEvent | None:
    payload = read_str(body.get("payload"), PAYLOAD_MAX)
    if payload is None:
        return None
    millis = (when - _EPOCH) // timedelta(milliseconds=1)
    mid = read_id(body.get("mid")) or f"postback:{user}:{millis}"
    return InboundChoice(
        channel=channel,
        account_id=account,
        contact_id=user,
        message_id=mid,
        timestamp=when,
        kind="postback",
        payload=payload,
        title=read_str(body.get("title")),
        referral=_referral(body.get("referral")),
        standby=standby,
    )


def _reaction(
    channel: str, account: str, user: str, when: datetime, body: dict[str, Any], standby: bool
) -> ChannelEvent | None:
    target = read_id(body.get("mid"))
    action = body.get("action")
    if target is None or action not in ("react", "unreact"):
        return None
    return Reaction(
        channel=channel,
        account_id=account,
        contact_id=user,
        target_message_id=target,
        timestamp=when,
        emoji=read_str(body.get("emoji"), 64),
        removed=action == "unreact",
        reaction=read_str(body.get("reaction"), 64),
        standby=standby,
    )


def _read(
    channel: str, account: str, user: str, when: datetime, body: dict[str, Any], standby: bool
) -> ChannelEvent | None:
    watermark = read_time(body.get("watermark"), millis=True)
    mid = read_id(body.get("mid"))
    if watermark is None and mid is None:
        return None
    return ReadReceipt(
        channel=channel,
        account_id=account,
        contact_id=user,
        timestamp=when,
        watermark=watermark,
        message_id=mid,
        standby=standby,
    )


def _delivery(
    channel: str, account: str, user: str, when: datetime, body: dict[str, Any], standby: bool
) -> ChannelEvent | None:
    watermark = read_time(body.get("watermark"), millis=True)
    mids = tuple(mid for mid in map(read_id, read_list(body.get("mids"))) if mid)
    if watermark is None and not mids:
        return None
    return DeliveryReceipt(
        channel=channel,
        account_id=account,
        contact_id=user,
        timestamp=when,
        message_ids=mids,
        watermark=watermark,
        standby=standby,
    )


def _handover(action: str) -> Reader:
    def read(
        channel: str, account: str, user: str, when: datetime, body: dict[str, Any], standby: bool
    ) -> ChannelEvent | None:
        return Handover(
            channel=channel,
            account_id=account,
            contact_id=user,
            timestamp=when,
            action=action,
            new_owner_app_id=read_id(body.get("new_owner_app_id")),
            previous_owner_app_id=read_id(body.get("previous_owner_app_id")),
            requested_owner_app_id=read_id(body.get("requested_owner_app_id")),
            metadata=read_str(body.get("metadata"), PAYLOAD_MAX),
            standby=standby,
        )

    return read


def _referral(value: Any) -> Referral | None:
    """A Messenger/Instagram referral: m.me / ig.me link ``ref``, ad (``ad_id`` and
    ``ads_context_data``), chat plugin (``referer_uri``) or shop ``product``."""
    if not isinstance(value, dict):
        return None
    ads = read_dict(value.get("ads_context_data"))
    referral = Referral(
        source=read_str(value.get("source"), 64),
        type=read_str(value.get("type"), 64),
        ref=read_str(value.get("ref"), PAYLOAD_MAX),
        ad_id=read_id(value.get("ad_id")),
        headline=read_str(ads.get("ad_title")),
        image_url=read_str(ads.get("photo_url"), URL_MAX),
        video_url=read_str(ads.get("video_url"), URL_MAX),
        post_id=read_id(ads.get("post_id")),
        product_id=read_id(ads.get("product_id"))
        or read_id(read_dict(value.get("product")).get("id")),
        referer_uri=read_str(value.get("referer_uri"), URL_MAX),
    )
    return None if referral == Referral() else referral


Reader = Callable[[str, str, str, datetime, dict[str, Any], bool], ChannelEvent | None]
"""(channel, account, contact, timestamp, event body, standby) → event, or None if malformed."""

_READERS: dict[str, Reader] = {
    "message": _message,
    "message_edit": _message_edit,
    "postback": _postback,
    "reaction": _reaction,
    "read": _read,
    "delivery": _delivery,
    **{action: _handover(action) for action in HANDOVER},
}
# The event keys in the order they are looked for; referral and optin are read in _event
# because their contact may be known only by a user_ref.
_EVENT_KEYS = (*_READERS, "referral", "optin")


# --- sending (Send API; meta-channels reference a.5, a.8) ------------------------------------
#
# Parley posts to ``/{PAGE_ID}/messages`` with the Page token as ``Authorization: Bearer`` (never
# in the query string, so it stays out of access logs). ``/me/messages`` is the same endpoint.

RESPONSE = "RESPONSE"  # a reply inside the 24-hour standard window
UPDATE = "UPDATE"  # proactive (not a direct reply) inside the window
MESSAGE_TAG = "MESSAGE_TAG"  # outside the window, with ``tag``
HUMAN_AGENT = "HUMAN_AGENT"  # the only tag Parley uses: a person answers within 7 days
SENDER_ACTIONS = ("mark_seen", "typing_on", "typing_off")
TEXT_LIMIT = 2000  # "UTF-8 and less than 2000 characters"
METADATA_LIMIT = 1000


def messaging_for(
    *,
    kind: str,
    is_reply: bool,
    since_user: timedelta | None,
    window: timedelta = timedelta(hours=24),
    human_window: timedelta = timedelta(days=7),
) -> tuple[str, str | None] | None:
    """``(messaging_type, tag)`` for an outbound message, or None when it may not be sent.

    ``since_user`` is the time since the user's last message (None: the user never wrote).
    Inside ``window``: ``RESPONSE`` for a reply and for a person's message (``kind == "human"``),
    ``UPDATE`` for a proactive bot message (a notice, a bot text that answers nothing). Outside
    it only a person may write, until ``human_window``, as ``MESSAGE_TAG`` + ``HUMAN_AGENT``; a bot
    message never carries a tag.
    """
    if since_user is None:
        return None
    since_user = max(since_user, timedelta(0))  # a clock a little ahead is "just now"
    human = kind == "human"
    if since_user <= window:
        return (RESPONSE, None) if is_reply or human else (UPDATE, None)
    if human and since_user <= human_window:
        return MESSAGE_TAG, HUMAN_AGENT
    return None


def build_text_send(
    *,
    page_id: str,
    recipient: str,
    text: str,
    messaging_type: str,
    tag: str | None = None,
    metadata: str | None = None,
    reply_to: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The Graph API path (after the version) and JSON body for one text message.

    ``reply_to`` (the user's ``mid``) quotes the message being answered — UNVERIFIED shape, sent
    only when ``PARLEY_MESSENGER_REPLY_CONTEXT`` is on.

    ``metadata`` (under 1000 characters; Parley puts the chunk's idempotency key there) comes
    back in the ``message_echoes`` webhook of this message: it is how a send whose answer was lost
    is recognised."""
    body: dict[str, Any] = {
        "recipient": {"id": recipient},
        "messaging_type": messaging_type,
        "message": {"text": text},
    }
    if tag:
        body["tag"] = tag
    if metadata:
        body["message"]["metadata"] = metadata[: METADATA_LIMIT - 1]
    if reply_to:
        body["reply_to"] = {"mid": reply_to}
    return f"{page_id}/messages", body


def build_sender_action(*, page_id: str, recipient: str, action: str) -> tuple[str, dict[str, Any]]:
    """``mark_seen``, ``typing_on`` or ``typing_off``: a request of its own, without ``message``."""
    if action not in SENDER_ACTIONS:
        raise ValueError(f"unknown sender action {action!r}")
    return f"{page_id}/messages", {"recipient": {"id": recipient}, "sender_action": action}


def sent_message_id(response: Any) -> str | None:
    """The ``mid`` from a successful send (``{"recipient_id", "message_id"}``)."""
    if isinstance(response, dict):
        value = response.get("message_id")
        if isinstance(value, str) and value:
            return value
    return None
