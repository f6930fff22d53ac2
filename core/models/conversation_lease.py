from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base


class ConversationLease(Base):
    """Who is working on a conversation right now. Taken by a conditional INSERT … ON CONFLICT
    (a lease past ``expires_at`` is taken over); no transaction is held while it is in use."""

    __tablename__ = "conversation_leases"

    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
