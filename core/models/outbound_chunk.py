from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedText


class OutboundChunk(CreatedAt, Base):
    """One Graph API send: a logical outbound message is 1..n chunks cut at the channel's limit.

    ``state``: ``pending → sending → sent | failed | dead``, plus ``unknown`` when a send timed out
    after the request went out (reconciled from status/echo webhooks, resent once after a grace
    period with ``resent`` set). Changed only by conditional UPDATEs. A chunk is sent only after
    every earlier chunk of its conversation is ``sent``, ``failed`` or ``dead``.
    """

    __tablename__ = "outbound_chunks"
    __table_args__ = (
        UniqueConstraint("message_id", "idx"),
        UniqueConstraint("idempotency_key"),
        UniqueConstraint("channel", "provider_message_id"),
        Index("ix_outbound_chunks_conversation_id_id", "conversation_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(16))
    idx: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(EncryptedText)
    idempotency_key: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    delivery: Mapped[str | None] = mapped_column(String(16))  # delivered | read (from webhooks)
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    resent: Mapped[bool] = mapped_column(Boolean, default=False)
    sending_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
