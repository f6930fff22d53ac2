"""The per-conversation lane: one worker at a time works on a conversation.

A lease row is taken with one conditional ``INSERT … ON CONFLICT DO UPDATE … WHERE expired``
and committed at once: no transaction or lock is held while the model runs, so transaction
pooling (PgBouncer) works. Writes made under a lease re-check it (:func:`still_held`, a row
lock inside the writing transaction), so a worker that was paused past its lease cannot write
over the one that took the conversation over.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select
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


def release(session: Session, conversation_id: int, holder: str) -> None:
    session.execute(
        delete(ConversationLease).where(
            ConversationLease.conversation_id == conversation_id,
            ConversationLease.holder == holder,
        )
    )
