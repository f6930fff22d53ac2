"""Normalized events every channel adapter produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class InboundText:
    channel: str
    account_id: str  # the receiving phone_number_id / page id / IG account id
    contact_id: str  # wa_id / PSID / IGSID of the sender
    contact_name: str | None
    message_id: str
    timestamp: datetime
    text: str
    reply_to: str | None = None


@dataclass(frozen=True)
class StatusUpdate:
    channel: str
    account_id: str
    message_id: str
    status: str  # sent | delivered | read | failed
    timestamp: datetime
    error_code: int | None = None
    # Our chunk's idempotency key, echoed from the send (WhatsApp biz_opaque_callback_data).
    callback_data: str | None = None


@dataclass(frozen=True)
class Unhandled:
    """A well-signed event Parley acknowledges and records but does not act on."""

    channel: str
    account_id: str | None
    reason: str
    raw: Any = field(repr=False)


Event = InboundText | StatusUpdate | Unhandled
