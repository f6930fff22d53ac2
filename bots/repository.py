"""Every query of the bots package."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.models import (
    Bot,
    ChannelAccount,
    Contact,
    Conversation,
    Message,
    MetaApp,
    Notice,
    Outcome,
    Workspace,
)


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


def message_conversation(session: Session, message_id: int) -> tuple[int, bool] | None:
    """(conversation id, whether the message already has its outcome) for an inbound message."""
    row = session.execute(
        select(Message.conversation_id, Outcome.inbound_id)
        .outerjoin(Outcome, Outcome.inbound_id == Message.id)
        .where(Message.id == message_id, Message.direction == "in")
    ).first()
    return None if row is None else (row[0], row[1] is not None)


@dataclass(frozen=True)
class ConversationContext:
    conversation: Conversation
    bot: Bot
    contact: Contact


def conversation_context(session: Session, conversation_id: int) -> ConversationContext:
    conversation, bot, contact = session.execute(
        select(Conversation, Bot, Contact)
        .join(Bot, Bot.id == Conversation.bot_id)
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(Conversation.id == conversation_id)
    ).one()
    return ConversationContext(conversation, bot, contact)


def pending_inbound(session: Session, conversation_id: int) -> list[Message]:
    """Inbound messages without an outcome, in order: provider timestamp, then arrival."""
    return list(
        session.scalars(
            select(Message)
            .outerjoin(Outcome, Outcome.inbound_id == Message.id)
            .where(
                Message.conversation_id == conversation_id,
                Message.direction == "in",
                Outcome.inbound_id.is_(None),
            )
            .order_by(Message.provider_ts, Message.id)
        )
    )


def history(session: Session, conversation_id: int, limit: int) -> list[Message]:
    """The last ``limit`` settled turns that belong in a prompt, oldest first: answered user
    messages and replies (bot or human) that did not fail. Pending messages (the turn being
    answered), notices, held, blocked and unanswered messages are not among them.

    Not bounded by the pending messages' ids: a reply stored after a newer message arrived
    has the larger id, and still precedes it in the conversation."""
    if limit <= 0:
        return []
    replied = select(Outcome.inbound_id).where(
        Outcome.conversation_id == conversation_id, Outcome.kind == "replied"
    )
    rows = session.scalars(
        select(Message)
        .where(
            Message.conversation_id == conversation_id,
            ((Message.direction == "in") & Message.id.in_(replied))
            | (
                (Message.direction == "out")
                & Message.kind.in_(["text", "human"])
                & Message.status.not_in(["failed", "dead"])
            ),
        )
        .order_by(Message.id.desc())
        .limit(limit)
    ).all()
    return list(reversed(rows))


def inbound_count_since(session: Session, contact_id: int, since: datetime) -> int:
    return session.execute(
        select(func.count())
        .select_from(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Conversation.contact_id == contact_id,
            Message.direction == "in",
            Message.created_at >= since,
        )
    ).scalar_one()


def tokens_since(session: Session, contact_id: int, since: datetime) -> int:
    tokens = Message.verdict["tokens"].as_integer()
    total: int = session.execute(
        select(func.coalesce(func.sum(tokens), 0))
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Conversation.contact_id == contact_id,
            Message.direction == "out",
            Message.created_at >= since,
        )
    ).scalar_one()
    return total


def has_bot_reply(session: Session, conversation_id: int) -> bool:
    return (
        session.execute(
            select(Message.id)
            .where(
                Message.conversation_id == conversation_id,
                Message.direction == "out",
                Message.kind == "text",
            )
            .limit(1)
        ).first()
        is not None
    )


def last_human_message_at(session: Session, conversation_id: int) -> datetime | None:
    return session.execute(
        select(func.max(Message.created_at)).where(
            Message.conversation_id == conversation_id,
            Message.direction == "out",
            Message.kind == "human",
        )
    ).scalar()


def notices_since(session: Session, conversation_id: int, kind: str, since: datetime) -> int:
    return session.execute(
        select(func.count())
        .select_from(Notice)
        .where(
            Notice.conversation_id == conversation_id,
            Notice.kind == kind,
            Notice.created_at >= since,
        )
    ).scalar_one()
