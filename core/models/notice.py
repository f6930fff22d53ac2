from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Identity, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt


class Notice(CreatedAt, Base):
    """A fixed text (holding message, opt-out confirmation, AI disclosure, limit notice) sent at
    most once per conversation per episode; never counted as the reply to a message."""

    __tablename__ = "notices"
    __table_args__ = (UniqueConstraint("conversation_id", "kind", "episode"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    episode: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
