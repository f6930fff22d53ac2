from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedText


class ConversationMemory(CreatedAt, Base):
    """A conversation's rolling summary (see ``bots/memory.py``).

    ``summary`` covers every prompt-eligible message with an id up to ``through_id`` (0: none
    yet); ``source_ids`` are the ids it was written from, so a summary whose source was later
    deleted or edited is discarded. ``fold_through_id`` is set while a fold is pending (the
    ``maintenance.fold_memory`` job writes the summary through it, then clears it).
    """

    __tablename__ = "conversation_memories"

    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    summary: Mapped[str | None] = mapped_column(EncryptedText)
    through_id: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    source_ids: Mapped[list[int]] = mapped_column(
        ARRAY(BigInteger), server_default=text("'{}'::bigint[]")
    )
    fold_through_id: Mapped[int | None] = mapped_column(BigInteger)
    fold_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    folded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    folds: Mapped[int] = mapped_column(Integer, server_default=text("0"))
