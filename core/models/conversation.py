from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt


class Conversation(CreatedAt, Base):
    """The thread between one contact and one channel account (and so one bot)."""

    __tablename__ = "conversations"
    __table_args__ = (UniqueConstraint("channel_account_id", "contact_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    bot_id: Mapped[int] = mapped_column(ForeignKey("bots.id", ondelete="CASCADE"), index=True)
    channel_account_id: Mapped[int] = mapped_column(
        ForeignKey("channel_accounts.id", ondelete="CASCADE")
    )
    contact_id: Mapped[int] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), index=True
    )
    last_inbound_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # bot | human | paused. While not "bot" the bot stays silent; see bots/policy.py.
    mode: Mapped[str] = mapped_column(String(8), server_default="bot")
    mode_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    flagged: Mapped[str | None] = mapped_column(String(64))  # why moderators should look
