from __future__ import annotations

from sqlalchemy import BigInteger, Identity, String
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedText


class UnhandledEvent(CreatedAt, Base):
    """A signed webhook event Parley acknowledged but does not act on (kept encrypted)."""

    __tablename__ = "unhandled_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(EncryptedText)
