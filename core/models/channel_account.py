from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Identity, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt, EncryptedText


class ChannelAccount(CreatedAt, Base):
    """A WhatsApp phone number, a Messenger page or an Instagram account owned by one bot.

    ``external_id`` is the id Meta routes by: ``phone_number_id``, the page id or the IG id.
    """

    __tablename__ = "channel_accounts"
    __table_args__ = (UniqueConstraint("channel", "external_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    bot_id: Mapped[int] = mapped_column(ForeignKey("bots.id", ondelete="CASCADE"), index=True)
    meta_app_id: Mapped[int] = mapped_column(ForeignKey("meta_apps.id", ondelete="RESTRICT"))
    channel: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(64))
    access_token: Mapped[str] = mapped_column(EncryptedText)
    status: Mapped[str] = mapped_column(String(16), default="active")
