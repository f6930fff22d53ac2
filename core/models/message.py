from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedText


class Message(CreatedAt, Base):
    """One message in or out. Bodies are encrypted; ``body_redacted`` is the PII-free copy that
    prompts, logs and list views use.

    Inbound status: ``received`` → ``replied`` | ``blocked`` | ``dead``.
    Outbound status: ``pending`` → ``sending`` → ``sent`` | ``failed`` | ``dead``, changed only by
    conditional UPDATEs. ``reply_to_id`` is unique: one reply per inbound message.
    """

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("channel", "provider_message_id"),
        UniqueConstraint("reply_to_id"),
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    direction: Mapped[str] = mapped_column(String(3))
    channel: Mapped[str] = mapped_column(String(16))
    # Outbound: text | notice (fixed texts: never the reply to a message) | human (a person) |
    # template (WhatsApp, outside the 24-hour window, sent only while APPROVED).
    # Inbound: text | media | location | contacts | choice | story_reply | story_mention |
    # unsupported, and deleted once the contact deleted it (body and content erased).
    kind: Mapped[str] = mapped_column(String(16), default="text")
    language: Mapped[str | None] = mapped_column(String(8))
    # As long as the adapters accept (webhooks.channels.events.ID_MAX): a longer id than the
    # column would fail every retry of the delivery.
    provider_message_id: Mapped[str | None] = mapped_column(String(512))
    provider_ts: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    body: Mapped[str | None] = mapped_column(EncryptedText)
    body_redacted: Mapped[str | None] = mapped_column(Text)
    # The normalized content beyond the text rendering in ``body`` (media, coordinates, shared
    # contacts, a choice's payload, reply context) as JSON; encrypted like the body.
    content: Mapped[str | None] = mapped_column(EncryptedText)
    status: Mapped[str] = mapped_column(String(16))
    reply_to_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    # The ids of the stored messages whose (redacted) text formed this reply's prompt.
    prompt_message_ids: Mapped[list[int] | None] = mapped_column(ARRAY(BigInteger))
    # Screening verdict: reason codes and action (never the matched text).
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
