"""The per-conversation lane: one worker at a time works on a conversation.

A lease row is taken with one conditional ``INSERT … ON CONFLICT DO UPDATE … WHERE expired``,
committed with the first turn's transaction (before the model is asked): no transaction or lock
is held while the model runs, so transaction pooling (PgBouncer) works. Writes made under a
lease re-check it in the writing transaction (:func:`still_held`, :func:`end_turn`: a row lock
held until commit), so a worker that was paused past its lease cannot write over the one that
took the conversation over.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.models import ConversationLease, utcnow


def acquire(session: Session, conversation_id: int, holder: str, seconds: float) -> bool:
    now = utcnow()
    values = insert(ConversationLease).values(
        conversation_id=conversation_id,
        holder=holder,
        expires_at=now + timedelta(seconds=seconds),
    )
    taken = values.on_conflict_do_update(
        index_elements=["conversation_id"],
        set_={"holder": values.excluded.holder, "expires_at": values.excluded.expires_at},
        where=(ConversationLease.expires_at < now) | (ConversationLease.holder == holder),
    ).returning(ConversationLease.holder)
    return session.execute(taken).scalar() == holder


# acquire() for the conversation of an inbound message that has no outcome yet, in one statement.
_ACQUIRE_FOR_MESSAGE = text(
    """
    INSERT INTO conversation_leases (conversation_id, holder, expires_at)
    SELECT m.conversation_id, :holder, :expires_at
      FROM messages AS m
     WHERE m.id = :message_id AND m.direction = 'in'
       AND NOT EXISTS (SELECT 1 FROM outcomes AS o WHERE o.inbound_id = m.id)
    ON CONFLICT (conversation_id) DO UPDATE
       SET holder = excluded.holder, expires_at = excluded.expires_at
     WHERE conversation_leases.expires_at < :now OR conversation_leases.holder = excluded.holder
    RETURNING conversation_id
    """
)


def acquire_for_message(
    session: Session, message_id: int, holder: str, seconds: float
) -> int | None:
    """Take the lease of the conversation of an inbound message still without its outcome; its
    conversation id. None: the lease is busy, or there is no such message (the caller tells
    which apart)."""
    now = utcnow()
    taken: int | None = session.execute(
        _ACQUIRE_FOR_MESSAGE,
        {
            "message_id": message_id,
            "holder": holder,
            "now": now,
            "expires_at": now + timedelta(seconds=seconds),
        },
    ).scalar()
    return taken


def still_held(session: Session, conversation_id: int, holder: str) -> bool:
    """Lock the lease row for the rest of the caller's (short) transaction if ``holder`` has it."""
    row = session.execute(
        select(ConversationLease.holder)
        .where(
            ConversationLease.conversation_id == conversation_id,
            ConversationLease.holder == holder,
            ConversationLease.expires_at > utcnow(),
        )
        .with_for_update()
    ).first()
    return row is not None


# still_held(), and in the same statement the release when no inbound message of the
# conversation is left without an outcome (the caller's writes of this transaction included).
_END_TURN = text(
    """
    WITH held AS (
        SELECT conversation_id FROM conversation_leases
         WHERE conversation_id = :conversation_id AND holder = :holder AND expires_at > :now
           FOR UPDATE
    ), released AS (
        DELETE FROM conversation_leases
         WHERE conversation_id IN (SELECT conversation_id FROM held)
           AND NOT EXISTS (
               SELECT 1 FROM messages AS m
                 LEFT JOIN outcomes AS o ON o.inbound_id = m.id
                WHERE m.conversation_id = :conversation_id AND m.direction = 'in'
                  AND o.inbound_id IS NULL)
        RETURNING conversation_id
    )
    SELECT EXISTS (SELECT 1 FROM held) AS held, EXISTS (SELECT 1 FROM released) AS released
    """
)


def end_turn(session: Session, conversation_id: int, holder: str) -> tuple[bool, bool]:
    """At the end of a transaction that wrote under the lease: whether ``holder`` still has it
    (locked until commit, like :func:`still_held`), and whether it was released because the
    conversation has nothing left to answer. The caller rolls back when it was not held."""
    row = session.execute(
        _END_TURN, {"conversation_id": conversation_id, "holder": holder, "now": utcnow()}
    ).one()
    return bool(row.held), bool(row.released)


def release(session: Session, conversation_id: int, holder: str) -> None:
    session.execute(
        delete(ConversationLease).where(
            ConversationLease.conversation_id == conversation_id,
            ConversationLease.holder == holder,
        )
    )
