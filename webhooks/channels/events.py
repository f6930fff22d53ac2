"""Normalized events every channel adapter produces, and the readers that build them.

Adapters (``whatsapp``, ``messenger``, ``instagram``) turn one decoded webhook body into a list of
these frozen dataclasses. They are pure and total: no I/O, no settings, no clock, and anything
unexpected becomes :class:`Unhandled` instead of an exception. Every event names its ``channel``
and ``account_id``: the receiving WhatsApp phone_number_id, Facebook Page id or Instagram account
id (the WhatsApp Business Account id for template status updates, which belong to no number).
Timestamps are timezone-aware UTC.

Whether an event may start a bot reply is the class attribute ``TRIGGERS_REPLY``, read through
:func:`triggers_reply`, which also says no for every event delivered on a Messenger/Instagram
``standby[]`` channel (another app owns the thread).

``Event`` is what ``webhooks/service.py`` consumes today; ``ChannelEvent`` is everything the
adapters produce. ``whatsapp.parse`` keeps returning ``Event`` (new kinds arrive there as
``Unhandled`` with their old reasons) until the intake handles ``ChannelEvent``;
``whatsapp.parse_events``, ``messenger.parse`` and ``instagram.parse`` return ``ChannelEvent``.

The kinds each channel produces are listed in ``SUPPORTED_EVENTS`` (a markdown table the
README quotes; a test holds it to the recorded payloads).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

# One row per event class: the source shape per channel ("—" where the channel has none) and
# whether it may trigger a reply.
SUPPORTED_EVENTS = """\
| event | WhatsApp (`changes[].value`) | Messenger (`messaging[]`/`standby[]`) | Instagram (`messaging[]`/`standby[]`) | may trigger a reply |
|---|---|---|---|---|
| `InboundText` | `text` (reply context, forwarded flags, ad referral) | `message.text` (reply_to, referral) | `message.text` (reply_to, referral) | yes |
| `InboundMedia` | `image`, `video`, `audio` (voice), `document` (filename), `sticker`: media id, mime, sha256, caption | `message.attachments[]` image/video/audio/file/fallback/template: URL and type | `message.attachments[]` image/video/audio/file/share/ig_reel/reel/ig_post: URL and type | yes |
| `InboundLocation` | `location` | `location` attachment | — | yes |
| `InboundContacts` | `contacts` | — | — | yes |
| `InboundChoice` | `interactive` button_reply / list_reply, template `button` | `postback`, `message.quick_reply` (payload) | `postback`, `message.quick_reply` (payload) | yes |
| `InboundStoryReply` | — | — | `message.reply_to.story` | yes |
| `InboundUnsupported` | `unsupported` / `unknown` (errors 131051, 131060) | — | `message.is_unsupported` | yes (a notice) |
| `InboundReferral` | — (rides on the message as `referral`) | `referral` (m.me links, ads, chat plugin) | `referral` (ig.me links, ads) | no |
| `InboundStoryMention` | — | — | `story_mention` attachment | no |
| `Reaction` | `reaction` (empty or missing emoji = removed) | `reaction` react / unreact | `reaction` react / unreact | never |
| `MessageEdited` | `edit` | `message_edit` | — | no |
| `MessageDeleted` | `revoke` | — | `message.is_deleted` | no |
| `MessageEcho` | — | `message.is_echo` (app_id, metadata) | `message.is_echo` | never |
| `ReadReceipt` | — (a `read` status) | `read.watermark` | `read.mid` | never |
| `DeliveryReceipt` | — (a `delivered` status) | `delivery.mids` / `watermark` | — | never |
| `StatusUpdate` | `statuses[]` sent / delivered / read / failed (+ error code, callback data) | — | — | never |
| `MarketingPreference` | field `user_preferences` (stop / resume) | — | — | no |
| `TemplateStatus` | field `message_template_status_update` | — | — | no |
| `OptIn` | — | `optin` | — | no |
| `Handover` | — | `pass_thread_control`, `take_thread_control`, `request_thread_control` | same three | no |
| `Unhandled` | every other `field` (`field:<name>`), message type (`message_type:<type>`, e.g. order, system, interactive:nfm_reply) or malformed shape | other events (`event:<key>`, e.g. app_roles, account_linking), `changes[]` fields, malformed shapes | as Messenger | no |
"""  # noqa: E501 - a markdown table needs one line per row

# --- value objects ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Referral:
    """Where a conversation came from: a click-to-WhatsApp / click-to-Messenger ad, an m.me or
    ig.me link, the chat plugin, or a shop product. Fields a channel does not send stay None."""

    source: str | None = None  # WhatsApp source_type ("ad", "post"); Messenger ADS / SHORTLINK …
    type: str | None = None  # Messenger/Instagram: OPEN_THREAD
    ref: str | None = None  # the ref parameter of the link or ad
    source_id: str | None = None  # WhatsApp: the ad or post id
    source_url: str | None = None
    ad_id: str | None = None
    headline: str | None = None  # WhatsApp headline; Messenger ads_context_data.ad_title
    body: str | None = None
    media_type: str | None = None
    image_url: str | None = None  # WhatsApp image_url; Messenger ads_context_data.photo_url
    video_url: str | None = None
    thumbnail_url: str | None = None
    ctwa_clid: str | None = None  # click-to-WhatsApp click id
    post_id: str | None = None
    product_id: str | None = None
    referer_uri: str | None = None


@dataclass(frozen=True, kw_only=True)
class Media:
    """One attachment. WhatsApp gives a media id to fetch (two steps, with the token);
    Messenger and Instagram give a CDN URL that expires."""

    kind: str  # image | video | audio | document | sticker | fallback | template | share | …
    media_id: str | None = None
    url: str | None = None
    mime_type: str | None = None
    sha256: str | None = None
    filename: str | None = None
    voice: bool = False  # a recorded voice note (WhatsApp audio)
    animated: bool = False  # WhatsApp sticker


@dataclass(frozen=True, kw_only=True)
class SharedPhone:
    phone: str | None = None
    wa_id: str | None = None
    type: str | None = None


@dataclass(frozen=True, kw_only=True)
class SharedContact:
    """One vCard-like contact of a WhatsApp ``contacts`` message."""

    name: str | None = None
    phones: tuple[SharedPhone, ...] = ()
    emails: tuple[str, ...] = ()
    organization: str | None = None


# --- events the intake consumes today --------------------------------------------------------


@dataclass(frozen=True)
class InboundText:
    """A text message from a contact. Replies: yes (never from ``standby``)."""

    TRIGGERS_REPLY: ClassVar[bool] = True

    channel: str
    account_id: str  # the receiving phone_number_id / page id / IG account id
    contact_id: str  # wa_id / PSID / IGSID of the sender
    contact_name: str | None
    message_id: str
    timestamp: datetime
    text: str
    reply_to: str | None = None
    forwarded: bool = False
    frequently_forwarded: bool = False
    referral: Referral | None = None
    standby: bool = False


@dataclass(frozen=True)
class StatusUpdate:
    """Delivery state of a message we sent (WhatsApp). Replies: never."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    message_id: str
    status: str  # sent | delivered | read | failed (also played, deleted)
    timestamp: datetime
    error_code: int | None = None
    # Our chunk's idempotency key, echoed from the send (WhatsApp biz_opaque_callback_data).
    callback_data: str | None = None


@dataclass(frozen=True)
class Unhandled:
    """A well-signed event Parley acknowledges and records but does not act on. Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str | None
    reason: str
    raw: Any = field(repr=False)


# --- message content -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InboundMedia:
    """Images, video, audio (``voice`` notes), documents, stickers and shared posts. WhatsApp
    sends one item with its ``caption``; Messenger/Instagram may send several attachments, with
    any text of the message as ``caption``. Replies: yes (never from ``standby``)."""

    TRIGGERS_REPLY: ClassVar[bool] = True

    channel: str
    account_id: str
    contact_id: str
    message_id: str
    timestamp: datetime
    media: tuple[Media, ...]
    caption: str | None = None
    contact_name: str | None = None
    reply_to: str | None = None
    forwarded: bool = False
    frequently_forwarded: bool = False
    referral: Referral | None = None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class InboundLocation:
    """A shared location (``name``/``address`` only for a chosen place). Replies: yes."""

    TRIGGERS_REPLY: ClassVar[bool] = True

    channel: str
    account_id: str
    contact_id: str
    message_id: str
    timestamp: datetime
    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None
    url: str | None = None
    contact_name: str | None = None
    reply_to: str | None = None
    forwarded: bool = False
    frequently_forwarded: bool = False
    referral: Referral | None = None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class InboundContacts:
    """Contact cards shared in WhatsApp. Replies: yes."""

    TRIGGERS_REPLY: ClassVar[bool] = True

    channel: str
    account_id: str
    contact_id: str
    message_id: str
    timestamp: datetime
    contacts: tuple[SharedContact, ...]
    contact_name: str | None = None
    reply_to: str | None = None
    forwarded: bool = False
    frequently_forwarded: bool = False
    referral: Referral | None = None


@dataclass(frozen=True, kw_only=True)
class InboundChoice:
    """The contact picked something we offered: ``kind`` is ``button_reply`` or ``list_reply``
    (WhatsApp interactive), ``template_button`` (WhatsApp template quick reply), ``quick_reply``
    or ``postback`` (Messenger/Instagram). ``payload`` is what we set when sending (button or
    row id, postback/quick-reply payload); ``title`` is what the contact saw and tapped.
    ``reply_to`` is the message that carried the buttons. Replies: yes."""

    TRIGGERS_REPLY: ClassVar[bool] = True

    channel: str
    account_id: str
    contact_id: str
    message_id: str
    timestamp: datetime
    kind: str
    payload: str
    title: str | None = None
    description: str | None = None  # WhatsApp list rows
    contact_name: str | None = None
    reply_to: str | None = None
    referral: Referral | None = None  # Messenger postbacks that open a thread
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class InboundStoryReply:
    """An Instagram reply to the account's story (``story_url`` expires in about a day).
    Replies: yes."""

    TRIGGERS_REPLY: ClassVar[bool] = True

    channel: str
    account_id: str
    contact_id: str
    message_id: str
    timestamp: datetime
    story_id: str | None
    story_url: str | None
    text: str | None = None
    media: tuple[Media, ...] = ()
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class InboundUnsupported:
    """A message the channel could not deliver to us: WhatsApp ``unsupported`` (131051 type
    unknown, 131060 currently unavailable; ``unsupported_type`` such as gif or poll) or an
    Instagram ``is_unsupported`` message. Replies: yes, with a notice rather than the model."""

    TRIGGERS_REPLY: ClassVar[bool] = True

    channel: str
    account_id: str
    contact_id: str
    message_id: str
    timestamp: datetime
    error_codes: tuple[int, ...] = ()
    unsupported_type: str | None = None
    contact_name: str | None = None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class InboundReferral:
    """The contact opened an existing thread from a link, an ad or the chat plugin (chat-plugin
    visitors are known only by ``user_ref``). Context for the next message. Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str | None
    timestamp: datetime
    referral: Referral
    user_ref: str | None = None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class InboundStoryMention:
    """The contact mentioned the account in their Instagram story (``url`` expires).
    Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    message_id: str
    timestamp: datetime
    url: str | None
    standby: bool = False


# --- changes to earlier messages -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Reaction:
    """A reaction to ``target_message_id``; ``removed`` for an un-reaction. WhatsApp gives the
    reaction its own ``message_id``; Messenger/Instagram give a ``reaction`` name (love, like …).
    Replies: never."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    target_message_id: str
    timestamp: datetime
    emoji: str | None
    removed: bool
    reaction: str | None = None
    message_id: str | None = None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class MessageEdited:
    """The contact edited ``original_message_id``; the new content replaces it in memory.
    WhatsApp gives the edit its own ``message_id``. Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    original_message_id: str
    timestamp: datetime
    text: str | None
    media: tuple[Media, ...] = ()
    message_id: str | None = None
    edit_count: int | None = None  # Messenger num_edit
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class MessageDeleted:
    """``original_message_id`` was deleted (WhatsApp revoke, Instagram unsend): it leaves
    memory and prompts. Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    original_message_id: str
    timestamp: datetime
    message_id: str | None = None
    standby: bool = False


# --- our side of the thread ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MessageEcho:
    """A message the page or account sent (this app, another app, or staff in the inbox).
    ``contact_id`` is the user it went to. ``app_id`` is the sending app (absent for the
    Instagram app and the inbox), ``metadata`` the string passed to the Send API. Replies: never."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    message_id: str
    timestamp: datetime
    text: str | None = None
    media: tuple[Media, ...] = ()
    app_id: str | None = None
    metadata: str | None = None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class ReadReceipt:
    """The contact read our messages: up to ``watermark`` (Messenger) or ``message_id``
    (Instagram). Replies: never."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    timestamp: datetime
    watermark: datetime | None = None
    message_id: str | None = None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class DeliveryReceipt:
    """Our messages reached the contact: ``message_ids`` and/or everything before
    ``watermark`` (Messenger). Replies: never."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    timestamp: datetime
    message_ids: tuple[str, ...] = ()
    watermark: datetime | None = None
    standby: bool = False


# --- account and thread state ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MarketingPreference:
    """A WhatsApp user stopped (``stop``) or resumed (``resume``) marketing messages.
    Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    timestamp: datetime
    value: str  # stop | resume
    category: str | None = None  # marketing_messages
    detail: str | None = None


@dataclass(frozen=True, kw_only=True)
class TemplateStatus:
    """A WhatsApp message template changed state (APPROVED, REJECTED, PAUSED, DISABLED …).
    ``account_id`` is the WhatsApp Business Account id. Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    name: str
    status: str
    language: str | None = None
    template_id: str | None = None
    reason: str | None = None
    timestamp: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class OptIn:
    """A Messenger opt-in: marketing-message subscription changes (``token`` is the
    notification_messages_token to send them with) or a Send-to-Messenger / checkbox plugin tap
    (``ref``, ``user_ref``). Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str | None
    timestamp: datetime
    type: str | None = None  # notification_messages …
    payload: str | None = None
    ref: str | None = None
    user_ref: str | None = None
    title: str | None = None
    token: str | None = field(default=None, repr=False)
    token_expires_at: datetime | None = None
    notification_status: str | None = None  # STOP NOTIFICATIONS | RESUME NOTIFICATIONS
    frequency: str | None = None
    standby: bool = False


@dataclass(frozen=True, kw_only=True)
class Handover:
    """Thread control moved or was asked for (Messenger/Instagram handover protocol):
    ``action`` is ``pass_thread_control``, ``take_thread_control`` or
    ``request_thread_control``. Replies: no."""

    TRIGGERS_REPLY: ClassVar[bool] = False

    channel: str
    account_id: str
    contact_id: str
    timestamp: datetime
    action: str
    new_owner_app_id: str | None = None
    previous_owner_app_id: str | None = None
    requested_owner_app_id: str | None = None
    metadata: str | None = None
    standby: bool = False


Event = InboundText | StatusUpdate | Unhandled
"""What ``webhooks/service.py`` consumes today (``whatsapp.parse``)."""

ChannelEvent = (
    InboundText
    | InboundMedia
    | InboundLocation
    | InboundContacts
    | InboundChoice
    | InboundStoryReply
    | InboundUnsupported
    | InboundReferral
    | InboundStoryMention
    | Reaction
    | MessageEdited
    | MessageDeleted
    | MessageEcho
    | ReadReceipt
    | DeliveryReceipt
    | StatusUpdate
    | MarketingPreference
    | TemplateStatus
    | OptIn
    | Handover
    | Unhandled
)
"""Everything the adapters produce (``parse_events`` / ``messenger.parse`` /
``instagram.parse``)."""


def triggers_reply(event: ChannelEvent) -> bool:
    """Whether ``event`` may start a bot reply. Echoes, reads, deliveries, statuses, reactions
    and anything delivered on ``standby`` never do; the pipeline's policies still decide."""
    return event.TRIGGERS_REPLY and not getattr(event, "standby", False)


# --- reading untrusted values ----------------------------------------------------------------
#
# Webhook bodies are signed by Meta but their contents come from users and may change shape.
# Every value is checked for type and size where it is read; a required value that fails makes
# the event Unhandled, an optional one is dropped (None). Strings must also be storable: no NUL
# (Postgres text refuses it) and no lone surrogates (json.loads accepts "\ud800").

ID_MAX = 512  # wamid, mid, PSID, IGSID, page/app/media ids
SHORT_MAX = 1024  # names, titles, mime types, emoji, filenames, languages, reasons
PAYLOAD_MAX = 4096  # button and row ids, postback / quick-reply payloads, echo metadata, tokens
URL_MAX = 8192
TEXT_MAX = 65_536  # message bodies and captions

_LABEL = re.compile(r"[A-Za-z0-9_.\-]{1,48}")
_DIGITS = re.compile(r"[0-9]{1,15}")
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
# Messenger and Instagram send milliseconds; a value this small can only be seconds (some
# reference examples show seconds), and reading it as milliseconds would land in 1970.
_SECONDS_BELOW = 100_000_000_000


def read_str(value: Any, limit: int = SHORT_MAX) -> str | None:
    """``value`` if it is a non-empty, storable string of at most ``limit`` characters."""
    if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def read_id(value: Any) -> str | None:
    """An identifier: a string, or a non-negative integer (Meta sends some app ids as numbers)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**30:
        return str(value)
    return read_str(value, ID_MAX)


def read_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**15:
        return value
    return None


def read_float(value: Any, bound: float) -> float | None:
    """A finite number within ``[-bound, bound]`` (coordinates)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or abs(number) > bound:
        return None
    return number


def read_flag(value: Any) -> bool:
    return value is True


def read_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def read_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def read_time(value: Any, *, millis: bool) -> datetime | None:
    """A Unix timestamp (an integer or a string of digits) as an aware UTC datetime."""
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        number: int | None = int(value)
    else:
        number = read_int(value)
    if number is None or number <= 0:
        return None
    if millis and number >= _SECONDS_BELOW:
        seconds, rest = divmod(number, 1000)
    else:
        seconds, rest = number, 0
    if seconds > _MAX_SECONDS:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC) + timedelta(milliseconds=rest)


def label(value: Any) -> str:
    """A short, safe token for a reason string (``field:<label>``, ``message_type:<label>``)."""
    if isinstance(value, str) and _LABEL.fullmatch(value):
        return value
    return "unknown" if value is None or isinstance(value, str) else type(value).__name__
