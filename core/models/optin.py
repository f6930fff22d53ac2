from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedText


class OptIn(CreatedAt, Base):
    """The latest Messenger opt-in of one person for one topic on one channel account.

    ``subject`` is the PSID, or ``user_ref:<ref>`` for a checkbox-plugin visitor; ``topic`` is
    the opt-in ``type`` (``notification_messages``) or ``plugin``. ``token`` (the
    notification_messages_token) is encrypted. A newer event replaces the row.
    """

    __tablename__ = "optins"
    __table_args__ = (UniqueConstraint("channel_account_id", "subject", "topic"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    channel_account_id: Mapped[int] = mapped_column(
        ForeignKey("channel_accounts.id", ondelete="CASCADE")
    )
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(String(600))
    topic: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str | None] = mapped_column(Text)
    ref: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    token: Mapped[str | None] = mapped_column(EncryptedText)
    token_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    notification_status: Mapped[str | None] = mapped_column(String(32))
    frequency: Mapped[str | None] = mapped_column(String(32))
    opted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
