"""Instagram adapter (pure): webhook payload → events, and how an ambiguous send is recognised in
an echo.

Webhooks (``object: instagram``) use Messenger's envelope — ``entry[].messaging[]`` and
``standby[]`` with the IG professional account id as ``entry.id``, the IGSID as ``sender.id`` —
and are read by :func:`webhooks.channels.messenger.parse_page`: text, attachments (image,
video, audio, file, share, ig_reel, reel, ig_post), story replies (``message.reply_to.story``)
and mentions (``story_mention`` attachments), unsend (``is_deleted``), ``is_unsupported``,
echoes (``is_echo``), reactions, seen (``read.mid``), postbacks, quick replies, referrals and
handover events.

Instagram documents no correlation field that comes back in its ``is_echo`` events (Messenger
echoes ``metadata``; WhatsApp echoes ``biz_opaque_callback_data``), so a send whose answer was
lost is matched by (recipient, hash of the text, send time ± 60 s).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from webhooks.channels.events import ChannelEvent, MessageEcho
from webhooks.channels.messenger import build_sender_action as messenger_build_sender_action
from webhooks.channels.messenger import parse_page

CHANNEL = "instagram"
OBJECT = "instagram"
MATCH_WINDOW = timedelta(seconds=60)


def parse(payload: Any) -> list[ChannelEvent]:
    """Translate one Instagram webhook body (already JSON-decoded) into events. Never raises."""
    return parse_page(payload, channel=CHANNEL, obj=OBJECT)


def text_hash(text: str) -> str:
    """A stable fingerprint of a chunk's text (NFC, surrounding whitespace ignored)."""
    normalized = unicodedata.normalize("NFC", text.strip())
    return hashlib.sha256(normalized.encode()).hexdigest()


@dataclass(frozen=True)
class PendingSend:
    """A chunk in state ``unknown``: sent to ``recipient`` at ``sent_at``, answer lost."""

    chunk_id: int
    recipient: str
    text_hash: str
    sent_at: datetime


@dataclass(frozen=True)
class Echo:
    recipient: str
    text_hash: str
    at: datetime


def match_echo(
    candidates: Sequence[PendingSend], echo: Echo, *, window: timedelta = MATCH_WINDOW
) -> PendingSend | None:
    """The ambiguous send this echo proves, if any.

    Same recipient, same text hash, and sent within ``window`` of the echo; among several, the
    one sent closest to the echo, then the oldest chunk (the earlier chunk of a conversation was
    sent first).
    """
    best: PendingSend | None = None
    best_key: tuple[float, int] | None = None
    for candidate in candidates:
        if candidate.recipient != echo.recipient or candidate.text_hash != echo.text_hash:
            continue
        distance = abs((echo.at - candidate.sent_at).total_seconds())
        if distance > window.total_seconds():
            continue
        key = (distance, candidate.chunk_id)
        if best_key is None or key < best_key:
            best, best_key = candidate, key
    return best


def echo_of(event: MessageEcho) -> Echo | None:
    """The :class:`Echo` to match against ambiguous sends, for an echo that carries text."""
    if event.text is None:
        return None
    return Echo(recipient=event.contact_id, text_hash=text_hash(event.text), at=event.timestamp)


# --- sending (Messenger API for Instagram; meta-channels reference a.5, a.8) -----------------
#
# ``POST /{IG_ID or PAGE_ID}/messages`` with the Page token as ``Authorization: Bearer``.
# ``messaging_type`` follows Messenger's rules (RESPONSE / UPDATE inside 24 h, HUMAN_AGENT for a
# person up to 7 days). No correlation field comes back in the echo: see :func:`match_echo`.

TEXT_LIMIT_BYTES = 1000  # "UTF-8 and 1000 bytes or less"


def build_text_send(
    *,
    account_id: str,
    recipient: str,
    text: str,
    messaging_type: str,
    tag: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The Graph API path (after the version) and JSON body for one text message."""
    body: dict[str, Any] = {
        "recipient": {"id": recipient},
        "messaging_type": messaging_type,
        "message": {"text": text},
    }
    if tag:
        body["tag"] = tag
    return f"{account_id}/messages", body


def build_sender_action(
    *, account_id: str, recipient: str, action: str
) -> tuple[str, dict[str, Any]]:
    """``mark_seen``, ``typing_on`` or ``typing_off`` for an Instagram conversation."""
    return messenger_build_sender_action(page_id=account_id, recipient=recipient, action=action)
