"""Every query of the bots package."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Bot, ChannelAccount, Conversation, Message, MetaApp, Workspace


def workspace_by_name(session: Session, name: str) -> Workspace | None:
    return session.scalars(select(Workspace).where(Workspace.name == name)).one_or_none()


def meta_app(session: Session, workspace_id: int, name: str) -> MetaApp | None:
    return session.scalars(
        select(MetaApp).where(MetaApp.workspace_id == workspace_id, MetaApp.name == name)
    ).one_or_none()


def bot(session: Session, workspace_id: int, name: str) -> Bot | None:
    return session.scalars(
        select(Bot).where(Bot.workspace_id == workspace_id, Bot.name == name)
    ).one_or_none()


def any_bot_exists(session: Session) -> bool:
    return session.execute(select(Bot.id).limit(1)).first() is not None


def channel_account(session: Session, channel: str, external_id: str) -> ChannelAccount | None:
    return session.scalars(
        select(ChannelAccount).where(
            ChannelAccount.channel == channel, ChannelAccount.external_id == external_id
        )
    ).one_or_none()


@dataclass(frozen=True)
class ReplyContext:
    message: Message
    conversation: Conversation
    bot: Bot


def reply_context(session: Session, message_id: int) -> ReplyContext | None:
    row = session.execute(
        select(Message, Conversation, Bot)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(Bot, Bot.id == Conversation.bot_id)
        .where(Message.id == message_id, Message.direction == "in")
    ).first()
    return None if row is None else ReplyContext(*row)


def recent_turns(session: Session, conversation_id: int, upto_id: int, limit: int) -> list[Message]:
    """The last ``limit`` messages of the conversation up to and including ``upto_id``, oldest
    first, leaving out outbound messages that never went out."""
    rows = session.scalars(
        select(Message)
        .where(
            Message.conversation_id == conversation_id,
            Message.id <= upto_id,
            Message.status.not_in(["failed", "dead"]),
        )
        .order_by(Message.id.desc())
        .limit(limit)
    ).all()
    return list(reversed(rows))


def reply_exists(session: Session, inbound_id: int) -> int | None:
    return session.execute(
        select(Message.id).where(Message.reply_to_id == inbound_id)
    ).scalar_one_or_none()
