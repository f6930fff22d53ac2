from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedText


class Contact(CreatedAt, Base):
    """A person on one channel: WhatsApp ``wa_id``, Messenger PSID or Instagram IGSID."""

    __tablename__ = "contacts"
    __table_args__ = (UniqueConstraint("workspace_id", "channel", "external_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(512))  # the adapters' ID_MAX
    display_name: Mapped[str | None] = mapped_column(EncryptedText)
    language: Mapped[str | None] = mapped_column(String(8))
    opted_out_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # WhatsApp user_preferences "stop" for marketing messages (templates of that category).
    marketing_opted_out_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    blocked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
