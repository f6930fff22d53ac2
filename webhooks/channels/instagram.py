"""Instagram adapter (pure). The send path and echo parsing arrive with the channels work; what is
here already is how an ambiguous send is recognised in an echo.

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

CHANNEL = "instagram"
MATCH_WINDOW = timedelta(seconds=60)


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
