from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedBytes


class MediaItem(CreatedAt, Base):
    """One attachment of an inbound ``media`` message, downloaded by ``maintenance.fetch_media``.

    ``idx`` is the attachment's position in the message's ``content`` JSON; one row per
    (message, idx). ``state``: ``pending`` → ``stored`` (``content`` holds the encrypted bytes)
    | ``refused`` (the SSRF guard, an integrity check or the size cap said no: never retried)
    | ``failed`` (not fetchable, or the job gave up). Changed only by conditional UPDATEs from
    ``pending``. ``error`` is a short reason, never content.
    """

    __tablename__ = "media"
    __table_args__ = (UniqueConstraint("message_id", "idx"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    mime_type: Mapped[str | None] = mapped_column(String(255))
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    content: Mapped[bytes | None] = mapped_column(EncryptedBytes)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    fetched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def image_parts(mime: str, content: bytes) -> dict[str, Any]:
    """An OpenAI-style ``image_url`` content part carrying ``content`` as a ``data:`` URL, for
    a user message whose ``content`` is a list (``[{"type": "text", …}, image_parts(…)]``) sent
    to a vision-role endpoint. Pure; raises ``ValueError`` for a type that is not an image."""
    mime = mime.split(";", 1)[0].strip().lower()
    if not mime.startswith("image/") or len(mime) == len("image/"):
        raise ValueError("not an image type")
    data = base64.b64encode(content).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}
