from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Identity, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedText


class MetaApp(CreatedAt, Base):
    """A Meta developer app: its secret signs webhooks, its verify token answers the handshake.

    Each channel answers its handshake with its own token: ``messenger_verify_token`` /
    ``instagram_verify_token`` when set, else ``verify_token``. ``instagram_app_secret`` signs
    the ``/webhooks/instagram`` route when set (Instagram API with Instagram Login may use the
    Instagram app's secret — UNVERIFIED), else ``app_secret``. All four are encrypted.
    """

    __tablename__ = "meta_apps"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    app_id: Mapped[str | None] = mapped_column(String(64))
    app_secret: Mapped[str] = mapped_column(EncryptedText)
    verify_token: Mapped[str] = mapped_column(EncryptedText)
    messenger_verify_token: Mapped[str | None] = mapped_column(EncryptedText)
    instagram_verify_token: Mapped[str | None] = mapped_column(EncryptedText)
    instagram_app_secret: Mapped[str | None] = mapped_column(EncryptedText)
