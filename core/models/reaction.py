from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Identity, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt


class Reaction(CreatedAt, Base):
    """A contact's current reaction to one message of a conversation (never a reply).

    One row per (conversation, target message): a newer reaction replaces it, an un-reaction
    sets ``removed``. ``message_id`` is the stored message when Parley knows it.
    """

    __tablename__ = "reactions"
    __table_args__ = (UniqueConstraint("conversation_id", "target_provider_message_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )
    channel: Mapped[str] = mapped_column(String(16))
    target_provider_message_id: Mapped[str] = mapped_column(String(512))
    emoji: Mapped[str | None] = mapped_column(String(64))
    reaction: Mapped[str | None] = mapped_column(String(32))  # Messenger/Instagram: love, like …
    removed: Mapped[bool] = mapped_column(Boolean, default=False)
    reacted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
