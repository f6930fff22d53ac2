"""Every query of the webhooks package (SQLAlchemy Core on the hot path)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.models import ChannelAccount, Contact, Conversation, Message, MetaApp, UnhandledEvent


@dataclass(frozen=True)
class AppSecrets:
    id: int
    workspace_id: int
    app_secret: str
    verify_token: str


def meta_apps(session: Session) -> list[AppSecrets]:
    rows = session.execute(
        select(MetaApp.id, MetaApp.workspace_id, MetaApp.app_secret, MetaApp.verify_token).order_by(
            MetaApp.id
        )
    ).all()
    return [AppSecrets(r.id, r.workspace_id, r.app_secret, r.verify_token) for r in rows]


def channel_account(session: Session, channel: str, external_id: str) -> ChannelAccount | None:
    return session.scalars(
        select(ChannelAccount).where(
            ChannelAccount.channel == channel, ChannelAccount.external_id == external_id
        )
    ).one_or_none()


def contact_id(
    session: Session, *, workspace_id: int, channel: str, external_id: str, name: str | None
) -> int:
    inserted = session.execute(
        insert(Contact)
        .values(
            workspace_id=workspace_id, channel=channel, external_id=external_id, display_name=name
        )
        .on_conflict_do_nothing(index_elements=["workspace_id", "channel", "external_id"])
        .returning(Contact.id)
    ).scalar()
    if inserted is not None:
        return inserted
    return session.execute(
        select(Contact.id).where(
            Contact.workspace_id == workspace_id,
            Contact.channel == channel,
            Contact.external_id == external_id,
        )
    ).scalar_one()


def conversation_id(session: Session, *, account: ChannelAccount, contact: int) -> int:
    inserted = session.execute(
        insert(Conversation)
        .values(
            workspace_id=account.workspace_id,
            bot_id=account.bot_id,
            channel_account_id=account.id,
            contact_id=contact,
        )
        .on_conflict_do_nothing(index_elements=["channel_account_id", "contact_id"])
        .returning(Conversation.id)
    ).scalar()
    if inserted is not None:
        return inserted
    return session.execute(
        select(Conversation.id).where(
            Conversation.channel_account_id == account.id, Conversation.contact_id == contact
        )
    ).scalar_one()


def insert_inbound(
    session: Session,
    *,
    workspace_id: int,
    conversation: int,
    channel: str,
    provider_message_id: str,
    provider_ts: datetime,
    body: str,
) -> int | None:
    """Store one inbound message; None when this provider id was already stored."""
    return session.execute(
        insert(Message)
        .values(
            workspace_id=workspace_id,
            conversation_id=conversation,
            direction="in",
            channel=channel,
            kind="text",
            provider_message_id=provider_message_id,
            provider_ts=provider_ts,
            body=body,
            status="received",
            attempts=0,
        )
        .on_conflict_do_nothing(index_elements=["channel", "provider_message_id"])
        .returning(Message.id)
    ).scalar()


def touch_conversation(session: Session, conversation: int, at: datetime) -> None:
    session.execute(
        update(Conversation).where(Conversation.id == conversation).values(last_inbound_at=at)
    )


STATUS_ORDER = ("pending", "sending", "sent", "delivered", "read")


def apply_status(session: Session, *, channel: str, provider_message_id: str, status: str) -> bool:
    """Move an outbound message's delivery state forward only; never backwards."""
    if status == "failed":
        allowed = ["pending", "sending", "sent"]
    elif status in STATUS_ORDER:
        allowed = list(STATUS_ORDER[: STATUS_ORDER.index(status)])
    else:
        return False
    result = session.execute(
        update(Message)
        .where(
            Message.channel == channel,
            Message.provider_message_id == provider_message_id,
            Message.direction == "out",
            Message.status.in_(allowed),
        )
        .values(status=status)
        .returning(Message.id)
    ).first()
    return result is not None


def record_unhandled(session: Session, *, channel: str, reason: str, payload: str) -> None:
    session.add(UnhandledEvent(channel=channel, reason=reason[:64], payload=payload))
