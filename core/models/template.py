from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt


class Template(CreatedAt, Base):
    """The review state of a WhatsApp message template, from template status webhooks.

    Keyed by (Meta app, WhatsApp Business Account id, name, language); the send lane sends a
    template only while ``status`` is ``APPROVED``. ``status_at`` only moves forward.
    """

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("meta_app_id", "waba_id", "name", "language"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    meta_app_id: Mapped[int] = mapped_column(ForeignKey("meta_apps.id", ondelete="CASCADE"))
    waba_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(512))
    language: Mapped[str] = mapped_column(String(32))  # "" when the webhook names none
    template_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    status_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
