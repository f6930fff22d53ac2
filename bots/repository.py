"""Every query of the bots package."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, func, select, text
from sqlalchemy.orm import Session, aliased, defer

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


# The statements of the reply pipeline's every turn are built once (bound parameters), so a
# turn does not pay for building and hashing them again.
_CONTEXT = (
    select(Conversation, Bot, Contact)
    .join(Bot, Bot.id == Conversation.bot_id)
    .join(Contact, Contact.id == Conversation.contact_id)
    .where(Conversation.id == bindparam("conversation_id"))
)


def conversation_context(session: Session, conversation_id: int) -> ConversationContext:
    conversation, bot, contact = session.execute(
        _CONTEXT, {"conversation_id": conversation_id}
    ).one()
    return ConversationContext(conversation, bot, contact)


@dataclass(frozen=True)
class TurnContext(ConversationContext):
    """The conversation context with what the turn's rules count: the contact's inbound
    messages since ``messages_since``, the tokens its replies used since ``tokens_since``, and
    whether the bot has replied in this conversation before."""

    recent_inbound: int
    recent_tokens: int
    has_bot_reply: bool


def turn_context(
    session: Session, conversation_id: int, *, messages_since: datetime, tokens_since: datetime
) -> TurnContext:
    """:func:`conversation_context`, :func:`inbound_count_since`, :func:`tokens_since` and
    :func:`has_bot_reply`, in one round trip."""
    row = session.execute(
        _TURN_CONTEXT,
        {
            "conversation_id": conversation_id,
            "messages_since": messages_since,
            "tokens_since": tokens_since,
        },
    ).one()
    conversation, bot, contact, recent_inbound, recent_tokens, replied = row
    return TurnContext(
        conversation, bot, contact, int(recent_inbound), int(recent_tokens), bool(replied)
    )


_PENDING = (
    select(Message)
    .outerjoin(Outcome, Outcome.inbound_id == Message.id)
    .where(
        Message.conversation_id == bindparam("conversation_id"),
        Message.direction == "in",
        Outcome.inbound_id.is_(None),
    )
    .order_by(Message.provider_ts, Message.id)
)


def pending_inbound(session: Session, conversation_id: int) -> list[Message]:
    """Inbound messages without an outcome, in order: provider timestamp, then arrival."""
    return list(session.scalars(_PENDING, {"conversation_id": conversation_id}))


_REPLIED = select(Outcome.inbound_id).where(
    Outcome.conversation_id == bindparam("conversation_id"), Outcome.kind == "replied"
)
_HISTORY = (
    select(Message)
    # A prompt reads only the redacted copy: the encrypted columns are not decrypted.
    .options(defer(Message.body), defer(Message.content))
    .where(
        Message.conversation_id == bindparam("conversation_id"),
        ((Message.direction == "in") & Message.id.in_(_REPLIED))
        | (
            (Message.direction == "out")
            & Message.kind.in_(["text", "human"])
            & Message.status.not_in(["failed", "dead"])
        ),
    )
    .order_by(Message.id.desc())
    .limit(bindparam("limit"))
)


def history(session: Session, conversation_id: int, limit: int) -> list[Message]:
    """The last ``limit`` settled turns that belong in a prompt, oldest first: answered user
    messages and replies (bot or human) that did not fail. Pending messages (the turn being
    answered), notices, held, blocked and unanswered messages are not among them.

    Not bounded by the pending messages' ids: a reply stored after a newer message arrived
    has the larger id, and still precedes it in the conversation."""
    if limit <= 0:
        return []
    rows = session.scalars(_HISTORY, {"conversation_id": conversation_id, "limit": limit}).all()
    return list(reversed(rows))


# One statement: the outcome rows (a row already there is left alone) and the inbound
# messages' status mirroring them. Returns how many of the ids name a message, and how many
# outcomes were written.
_SETTLE = text(
    """
    WITH batch AS (
        SELECT id FROM messages WHERE id = ANY(CAST(:ids AS bigint[]))
    ), written AS (
        INSERT INTO outcomes (inbound_id, conversation_id, kind, reply_id, detail)
        SELECT id, :conversation_id, :kind, :reply_id, :detail FROM batch
        ON CONFLICT DO NOTHING
        RETURNING inbound_id
    ), marked AS (
        UPDATE messages SET status = :kind WHERE id IN (SELECT inbound_id FROM written)
    )
    SELECT (SELECT count(*) FROM batch) AS found, (SELECT count(*) FROM written) AS written
    """
)


def settle(
    session: Session,
    conversation_id: int,
    ids: Sequence[int],
    kind: str,
    *,
    reply_id: int | None = None,
    detail: str | None = None,
) -> tuple[int, int]:
    """Write an outcome for each inbound message in ``ids``: (messages found, outcomes
    written). Fewer written than found means another run settled some of them first."""
    row = session.execute(
        _SETTLE,
        {
            "ids": list(ids),
            "conversation_id": conversation_id,
            "kind": kind,
            "reply_id": reply_id,
            "detail": detail,
        },
    ).one()
    return int(row.found), int(row.written)


_MESSAGES = Message.metadata.tables["messages"]

# The reply and settle() for the messages it answers, in one statement. The bound parameters
# take the columns' types, so the body is encrypted like any other.
_STORE_REPLY = text(
    """
    WITH reply AS (
        INSERT INTO messages (workspace_id, conversation_id, direction, channel, kind, body,
                              body_redacted, status, reply_to_id, prompt_message_ids, verdict,
                              attempts)
        VALUES (:workspace_id, :conversation_id, 'out', :channel, 'text', :body,
                :body_redacted, 'pending', :reply_to_id, :prompt_message_ids, :verdict, 0)
        RETURNING id
    ), batch AS (
        SELECT id FROM messages WHERE id = ANY(CAST(:ids AS bigint[]))
    ), written AS (
        INSERT INTO outcomes (inbound_id, conversation_id, kind, reply_id)
        SELECT batch.id, :conversation_id, 'replied', reply.id FROM batch CROSS JOIN reply
        ON CONFLICT DO NOTHING
        RETURNING inbound_id
    ), marked AS (
        UPDATE messages SET status = 'replied' WHERE id IN (SELECT inbound_id FROM written)
    )
    SELECT (SELECT id FROM reply) AS reply_id,
           (SELECT count(*) FROM batch) AS found,
           (SELECT count(*) FROM written) AS written
    """
).bindparams(
    bindparam("body", type_=_MESSAGES.c.body.type),
    bindparam("prompt_message_ids", type_=_MESSAGES.c.prompt_message_ids.type),
    bindparam("verdict", type_=_MESSAGES.c.verdict.type),
)


def store_reply(
    session: Session,
    *,
    workspace_id: int,
    conversation_id: int,
    channel: str,
    body: str,
    body_redacted: str,
    answers: Sequence[int],
    prompt_message_ids: Sequence[int],
    verdict: dict[str, Any],
) -> tuple[int, int, int]:
    """Store the bot's reply (outbound, ``pending`` until the send lane takes it) to the last
    of ``answers`` and settle them all as ``replied`` with it: (reply id, messages found,
    outcomes written), as :func:`settle` counts them."""
    row = session.execute(
        _STORE_REPLY,
        {
            "workspace_id": workspace_id,
            "conversation_id": conversation_id,
            "channel": channel,
            "body": body,
            "body_redacted": body_redacted,
            "reply_to_id": answers[-1],
            "prompt_message_ids": list(prompt_message_ids),
            "verdict": verdict,
            "ids": list(answers),
        },
    ).one()
    return int(row.reply_id), int(row.found), int(row.written)


_INBOUND_COUNT = (
    select(func.count())
    .select_from(Message)
    .join(Conversation, Conversation.id == Message.conversation_id)
    .where(
        Conversation.contact_id == bindparam("contact_id"),
        Message.direction == "in",
        Message.created_at >= bindparam("messages_since"),
    )
)
_TOKENS = (
    select(func.coalesce(func.sum(Message.verdict["tokens"].as_integer()), 0))
    .join(Conversation, Conversation.id == Message.conversation_id)
    .where(
        Conversation.contact_id == bindparam("contact_id"),
        Message.direction == "out",
        Message.created_at >= bindparam("tokens_since"),
    )
)


# The context with the two counts above and has_bot_reply() as subqueries, correlated with the
# context's contact and conversation (aliases inside, so the counts span every conversation of
# the contact).
_usage_message = aliased(Message)
_usage_conversation = aliased(Conversation)
_replied_before = aliased(Message)
_TURN_CONTEXT = _CONTEXT.add_columns(
    select(func.count())
    .select_from(_usage_message)
    .join(_usage_conversation, _usage_conversation.id == _usage_message.conversation_id)
    .where(
        _usage_conversation.contact_id == Contact.id,
        _usage_message.direction == "in",
        _usage_message.created_at >= bindparam("messages_since"),
    )
    .correlate(Contact)
    .scalar_subquery(),
    select(func.coalesce(func.sum(_usage_message.verdict["tokens"].as_integer()), 0))
    .select_from(_usage_message)
    .join(_usage_conversation, _usage_conversation.id == _usage_message.conversation_id)
    .where(
        _usage_conversation.contact_id == Contact.id,
        _usage_message.direction == "out",
        _usage_message.created_at >= bindparam("tokens_since"),
    )
    .correlate(Contact)
    .scalar_subquery(),
    exists()
    .where(
        _replied_before.conversation_id == Conversation.id,
        _replied_before.direction == "out",
        _replied_before.kind == "text",
    )
    .correlate(Conversation),
)


def inbound_count_since(session: Session, contact_id: int, since: datetime) -> int:
    count: int = session.execute(
        _INBOUND_COUNT, {"contact_id": contact_id, "messages_since": since}
    ).scalar_one()
    return count


def tokens_since(session: Session, contact_id: int, since: datetime) -> int:
    total: int = session.execute(
        _TOKENS, {"contact_id": contact_id, "tokens_since": since}
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
