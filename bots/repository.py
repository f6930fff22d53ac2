"""Every query of the bots package."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, func, select, text, update
from sqlalchemy.orm import Session, aliased, defer

from core.models import (
    Bot,
    ChannelAccount,
    Contact,
    Conversation,
    ConversationMemory,
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
# What may enter a prompt: answered user messages and replies (bot or human) that did not fail
# to send, each with its redacted copy. A message the contact deleted or unsent (kind
# ``deleted``, copies erased) or edited (redacted copy cleared until screened again) is left out.
_IN_PROMPT = (
    (Message.conversation_id == bindparam("conversation_id"))
    & Message.body_redacted.is_not(None)
    & (Message.kind != "deleted")
    & (
        ((Message.direction == "in") & Message.id.in_(_REPLIED))
        | (
            (Message.direction == "out")
            & Message.kind.in_(["text", "human"])
            & Message.status.not_in(["failed", "dead"])
        )
    )
)
_HISTORY = (
    select(Message)
    # A prompt reads only the redacted copy: the encrypted columns are not decrypted.
    .options(defer(Message.body), defer(Message.content))
    .where(_IN_PROMPT)
    .order_by(Message.id.desc())
    .limit(bindparam("limit"))
)


def history(session: Session, conversation_id: int, limit: int) -> list[Message]:
    """The last ``limit`` settled turns that belong in a prompt, oldest first: answered user
    messages and replies (bot or human) that did not fail, never a deleted, unsent or edited
    one. Pending messages (the turn being answered), notices, held, blocked and unanswered
    messages are not among them.

    Not bounded by the pending messages' ids: a reply stored after a newer message arrived
    has the larger id, and still precedes it in the conversation."""
    if limit <= 0:
        return []
    rows = session.scalars(_HISTORY, {"conversation_id": conversation_id, "limit": limit}).all()
    return list(reversed(rows))


_UNFOLDED = (
    select(Message)
    .options(defer(Message.body), defer(Message.content))
    .where(_IN_PROMPT, Message.id > bindparam("after_id"))
    .order_by(Message.id.desc())
    .limit(bindparam("limit"))
)


def unfolded_history(
    session: Session, conversation_id: int, *, after_id: int, limit: int
) -> tuple[list[Message], bool]:
    """The newest ``limit`` prompt turns with an id above ``after_id`` (those no summary covers
    yet), oldest first, and whether older ones above ``after_id`` exist beyond them."""
    if limit <= 0:
        return [], False
    rows = session.scalars(
        _UNFOLDED,
        {"conversation_id": conversation_id, "after_id": after_id, "limit": limit + 1},
    ).all()
    return list(reversed(rows[:limit])), len(rows) > limit


_RANGE = (
    select(Message)
    .options(defer(Message.body), defer(Message.content))
    .where(
        _IN_PROMPT,
        Message.id > bindparam("after_id"),
        Message.id <= bindparam("through_id"),
    )
    .order_by(Message.id)
)


def history_range(
    session: Session, conversation_id: int, *, after_id: int, through_id: int
) -> list[Message]:
    """Every prompt turn with ``after_id < id <= through_id``, oldest first (what a fold
    summarises)."""
    return list(
        session.scalars(
            _RANGE,
            {"conversation_id": conversation_id, "after_id": after_id, "through_id": through_id},
        )
    )


def conversation_memory(session: Session, conversation_id: int) -> ConversationMemory | None:
    return session.get(ConversationMemory, conversation_id)


_STILL_USABLE = text(
    """
    SELECT count(*) FROM messages
     WHERE id = ANY(CAST(:ids AS bigint[])) AND kind <> 'deleted' AND body_redacted IS NOT NULL
    """
)


def sources_intact(session: Session, source_ids: Sequence[int]) -> bool:
    """Whether every message a summary was written from may still enter a prompt (none was
    deleted, unsent, edited or erased since)."""
    if not source_ids:
        return True
    found: int = session.execute(_STILL_USABLE, {"ids": list(source_ids)}).scalar_one()
    return found == len(set(source_ids))


_REQUEST_FOLD = text(
    """
    INSERT INTO conversation_memories AS m (conversation_id, fold_through_id, fold_requested_at)
    VALUES (:conversation_id, :through_id, now())
    ON CONFLICT (conversation_id) DO UPDATE
       SET fold_through_id = EXCLUDED.fold_through_id,
           fold_requested_at = EXCLUDED.fold_requested_at
     WHERE m.fold_through_id IS NULL
    RETURNING m.conversation_id
    """
)


def request_fold(session: Session, conversation_id: int, through_id: int) -> bool:
    """Mark a fold through ``through_id`` pending, unless one already is: True when this call
    did (the caller then enqueues the job, in the same transaction)."""
    row = session.execute(
        _REQUEST_FOLD, {"conversation_id": conversation_id, "through_id": through_id}
    ).first()
    return row is not None


def store_fold(
    session: Session,
    conversation_id: int,
    *,
    base_through: int,
    through_id: int,
    summary: str,
    source_ids: Sequence[int],
) -> bool:
    """Write the summary through ``through_id`` (written from ``source_ids``) and clear the
    pending fold, if the stored summary still ends at ``base_through`` (no other fold landed in
    between): True when it did."""
    written = session.execute(
        update(ConversationMemory)
        .where(
            ConversationMemory.conversation_id == conversation_id,
            ConversationMemory.through_id == base_through,
        )
        .values(
            summary=summary,
            through_id=through_id,
            source_ids=list(source_ids),
            fold_through_id=None,
            fold_requested_at=None,
            folded_at=func.now(),
            folds=ConversationMemory.folds + 1,
        )
        .returning(ConversationMemory.conversation_id)
    ).first()
    return written is not None


def clear_fold(session: Session, conversation_id: int, through_id: int | None = None) -> None:
    """Forget a pending fold (through ``through_id``, or any), so a later turn asks again."""
    statement = update(ConversationMemory).where(
        ConversationMemory.conversation_id == conversation_id
    )
    if through_id is not None:
        statement = statement.where(ConversationMemory.fold_through_id == through_id)
    session.execute(statement.values(fold_through_id=None, fold_requested_at=None))


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
