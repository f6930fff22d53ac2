"""Every query of the webhooks package (SQLAlchemy Core on the hot path)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.models import (
    ChannelAccount,
    Contact,
    Conversation,
    Message,
    MetaApp,
    OutboundChunk,
    Outcome,
    UnhandledEvent,
)
from webhooks.channels.events import StatusUpdate


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


def record_unhandled(session: Session, *, channel: str, reason: str, payload: str) -> None:
    session.add(UnhandledEvent(channel=channel, reason=reason[:64], payload=payload))


def app_secret_for_account(session: Session, channel: str, external_id: str) -> str | None:
    """The secret of the Meta app that owns a channel account (the sandbox signs with it)."""
    return session.execute(
        select(MetaApp.app_secret)
        .join(ChannelAccount, ChannelAccount.meta_app_id == MetaApp.id)
        .where(ChannelAccount.channel == channel, ChannelAccount.external_id == external_id)
    ).scalar()


# --- the send lane ------------------------------------------------------------------------------

CHUNK_TERMINAL = ("sent", "failed", "dead")
MESSAGE_TERMINAL = ("sent", "failed", "dead")


@dataclass(frozen=True)
class Outbound:
    """Everything the send lane needs about one logical outbound message."""

    message_id: int
    status: str
    kind: str
    body: str | None
    workspace_id: int
    conversation_id: int
    channel: str
    account_id: int
    account: str  # phone_number_id / page id / IG id
    account_status: str
    access_token: str
    recipient: str
    last_inbound_at: datetime | None


@dataclass(frozen=True)
class Chunk:
    id: int
    idx: int
    total: int
    state: str
    body: str
    idempotency_key: str
    attempts: int
    resent: bool
    sending_since: datetime | None


def outbound(session: Session, message_id: int) -> Outbound | None:
    row = session.execute(
        select(
            Message.id.label("message_id"),
            Message.status,
            Message.kind,
            Message.body,
            Message.workspace_id,
            Message.conversation_id,
            ChannelAccount.channel,
            ChannelAccount.id.label("account_id"),
            ChannelAccount.external_id.label("account"),
            ChannelAccount.status.label("account_status"),
            ChannelAccount.access_token,
            Contact.external_id.label("recipient"),
            Conversation.last_inbound_at,
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(ChannelAccount, ChannelAccount.id == Conversation.channel_account_id)
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(Message.id == message_id, Message.direction == "out")
    ).first()
    return None if row is None else Outbound(**row._mapping)


def account_status(session: Session, account_id: int) -> str:
    return session.execute(
        select(ChannelAccount.status).where(ChannelAccount.id == account_id)
    ).scalar_one()


def create_chunks(session: Session, message: Outbound, parts: Sequence[str]) -> None:
    """One row per part; idempotent (a second run inserts nothing)."""
    session.execute(
        insert(OutboundChunk)
        .values(
            [
                {
                    "workspace_id": message.workspace_id,
                    "conversation_id": message.conversation_id,
                    "message_id": message.message_id,
                    "channel": message.channel,
                    "idx": idx,
                    "total": len(parts),
                    "body": part,
                    "idempotency_key": f"{message.message_id}:{idx}",
                    "state": "pending",
                    "attempts": 0,
                    "resent": False,
                }
                for idx, part in enumerate(parts)
            ]
        )
        .on_conflict_do_nothing(index_elements=["message_id", "idx"])
    )


_CHUNK_COLUMNS = (
    OutboundChunk.id,
    OutboundChunk.idx,
    OutboundChunk.total,
    OutboundChunk.state,
    OutboundChunk.body,
    OutboundChunk.idempotency_key,
    OutboundChunk.attempts,
    OutboundChunk.resent,
    OutboundChunk.sending_since,
)


def chunk_ids(session: Session, message_id: int) -> list[int]:
    return list(
        session.execute(
            select(OutboundChunk.id)
            .where(OutboundChunk.message_id == message_id)
            .order_by(OutboundChunk.idx)
        ).scalars()
    )


def chunk(session: Session, chunk_id: int) -> Chunk:
    row = session.execute(select(*_CHUNK_COLUMNS).where(OutboundChunk.id == chunk_id)).one()
    return Chunk(*row)


def earlier_unfinished(session: Session, *, conversation_id: int, message_id: int) -> bool:
    """Whether an earlier outbound message of the conversation still has chunks to send.

    Compared by message id, not chunk id: an earlier message whose send job has not created
    its chunks yet must still go first.
    """
    return bool(
        session.execute(
            select(
                exists().where(
                    Message.conversation_id == conversation_id,
                    Message.direction == "out",
                    Message.id < message_id,
                    Message.status.in_(["pending", "sending"]),
                )
            )
        ).scalar()
    )


def claim_chunk(
    session: Session, chunk_id: int, *, now: datetime, resend: bool = False
) -> int | None:
    """``pending → sending`` (or ``unknown → sending`` once, for a resend); the new attempt
    count, or None when another run changed the chunk first."""
    condition = (
        (OutboundChunk.state == "unknown") & (OutboundChunk.resent.is_(False))
        if resend
        else OutboundChunk.state == "pending"
    )
    values: dict[str, Any] = {
        "state": "sending",
        "sending_since": now,
        "attempts": OutboundChunk.attempts + 1,
    }
    if resend:
        values["resent"] = True
    return session.execute(
        update(OutboundChunk)
        .where(OutboundChunk.id == chunk_id, condition)
        .values(**values)
        .returning(OutboundChunk.attempts)
    ).scalar()


def mark_sent(
    session: Session, chunk_id: int, *, provider_message_id: str | None, now: datetime
) -> bool:
    return (
        session.execute(
            update(OutboundChunk)
            .where(OutboundChunk.id == chunk_id, OutboundChunk.state == "sending")
            .values(
                state="sent", provider_message_id=provider_message_id, sent_at=now, last_error=None
            )
            .returning(OutboundChunk.id)
        ).first()
        is not None
    )


def move_chunk(
    session: Session,
    chunk_id: int,
    *,
    from_states: Sequence[str],
    to: str,
    error: str | None,
    refund: bool = False,
) -> bool:
    """A conditional state change; ``refund`` gives back the attempt the claim counted."""
    values: dict[str, Any] = {"state": to, "last_error": error}
    if refund:
        values["attempts"] = OutboundChunk.attempts - 1
    return (
        session.execute(
            update(OutboundChunk)
            .where(OutboundChunk.id == chunk_id, OutboundChunk.state.in_(list(from_states)))
            .values(**values)
            .returning(OutboundChunk.id)
        ).first()
        is not None
    )


def end_message_chunks(session: Session, message_id: int, *, to: str, error: str) -> int:
    """Move every chunk of the message that has not gone out to ``failed`` or ``dead``."""
    return len(
        session.execute(
            update(OutboundChunk)
            .where(
                OutboundChunk.message_id == message_id,
                OutboundChunk.state.in_(["pending", "sending", "unknown"]),
            )
            .values(state=to, last_error=error)
            .returning(OutboundChunk.id)
        ).all()
    )


def any_chunk_sent(session: Session, message_id: int) -> bool:
    return bool(
        session.execute(
            select(
                exists().where(
                    OutboundChunk.message_id == message_id, OutboundChunk.state == "sent"
                )
            )
        ).scalar()
    )


def end_message(session: Session, message_id: int, *, status: str, error: str) -> None:
    """A message that never got chunks (empty body, unsupported channel) ends as a whole."""
    session.execute(
        update(Message)
        .where(Message.id == message_id, Message.status.in_(["pending", "sending"]))
        .values(status=status, last_error=error)
    )


def expire_replies(session: Session, message_id: int) -> int:
    """The inbound messages this reply answered end as ``window_expired`` instead of ``replied``."""
    return len(
        session.execute(
            update(Outcome)
            .where(Outcome.reply_id == message_id, Outcome.kind == "replied")
            .values(kind="window_expired", detail="reply not sent: messaging window closed")
            .returning(Outcome.inbound_id)
        ).all()
    )


_REFRESH = text(
    """
    UPDATE messages AS m
       SET status = a.status,
           attempts = a.attempts,
           last_error = a.last_error,
           sent_at = CASE WHEN a.status = 'sent' THEN coalesce(m.sent_at, a.sent_at)
                          ELSE m.sent_at END,
           provider_message_id = CASE WHEN a.status = 'sent'
                                      THEN coalesce(m.provider_message_id, a.first_id)
                                      ELSE m.provider_message_id END
      FROM (SELECT message_id,
                   CASE WHEN bool_and(state = 'sent') THEN 'sent'
                        WHEN bool_or(state IN ('pending', 'sending', 'unknown')) THEN
                             CASE WHEN bool_or(state <> 'pending' OR attempts > 0)
                                  THEN 'sending' ELSE 'pending' END
                        WHEN bool_or(state = 'dead') THEN 'dead'
                        ELSE 'failed' END AS status,
                   max(attempts) AS attempts,
                   max(sent_at) AS sent_at,
                   max(provider_message_id) FILTER (WHERE idx = 0) AS first_id,
                   (array_agg(last_error ORDER BY idx)
                        FILTER (WHERE last_error IS NOT NULL))[1] AS last_error
              FROM outbound_chunks
             WHERE message_id = ANY(CAST(:ids AS bigint[]))
             GROUP BY message_id) AS a
     WHERE m.id = a.message_id
       AND m.status IS DISTINCT FROM a.status
       AND m.status NOT IN ('sent', 'failed', 'dead')
    RETURNING m.id, m.status
    """
)


def refresh_message_status(session: Session, message_ids: Sequence[int]) -> dict[int, str]:
    """Set each message's status to the aggregate of its chunks: ``pending`` until one is
    tried, ``sending`` while any is unfinished, then ``sent`` (all sent), ``dead`` (any dead)
    or ``failed``. A message already finished is not changed. Returns what changed."""
    if not message_ids:
        return {}
    rows = session.execute(_REFRESH, {"ids": sorted(set(message_ids))}).all()
    return {r.id: r.status for r in rows}


def set_account_status(session: Session, account_id: int, *, status: str, was: str) -> bool:
    return (
        session.execute(
            update(ChannelAccount)
            .where(ChannelAccount.id == account_id, ChannelAccount.status == was)
            .values(status=status)
            .returning(ChannelAccount.id)
        ).first()
        is not None
    )


# --- status webhooks ----------------------------------------------------------------------------

DELIVERY_RANK = {"sent": 1, "delivered": 2, "read": 3}

# One statement for every status of a batch. A chunk is found by the provider's message id, or,
# while its send is unresolved (sending/unknown), by the idempotency key the send carried in
# biz_opaque_callback_data; only chunks of a channel account owned by the Meta app that signed
# the webhook are touched. Everything only moves forward: sending/unknown → sent | failed,
# delivery NULL → delivered → read.
_APPLY_STATUSES = text(
    """
    WITH v AS (
        SELECT * FROM unnest(
            CAST(:app_ids AS bigint[]), CAST(:channels AS text[]), CAST(:accounts AS text[]),
            CAST(:wamids AS text[]), CAST(:callbacks AS text[]), CAST(:ranks AS int[]),
            CAST(:failed AS boolean[]), CAST(:codes AS int[])
        ) AS v(app_id, channel, account, wamid, callback, rank, failed, code)
    ), hit AS (
        -- Two lookups, each on its own unique index, instead of one OR join (which the
        -- planner turns into a scan of every chunk of the account).
        SELECT DISTINCT ON (c.id) c.id, v.wamid, v.rank, v.failed, v.code
          FROM v
          CROSS JOIN LATERAL (
                SELECT c1.id, c1.conversation_id FROM outbound_chunks AS c1
                 WHERE c1.channel = v.channel AND c1.provider_message_id = v.wamid
                UNION
                SELECT c2.id, c2.conversation_id FROM outbound_chunks AS c2
                 WHERE v.callback IS NOT NULL AND c2.idempotency_key = v.callback
                   AND c2.channel = v.channel AND c2.state IN ('sending', 'unknown')
          ) AS c
          JOIN conversations AS cv ON cv.id = c.conversation_id
          JOIN channel_accounts AS a
            ON a.id = cv.channel_account_id AND a.external_id = v.account
           AND a.meta_app_id = v.app_id
         ORDER BY c.id, v.rank DESC, v.failed DESC
    )
    UPDATE outbound_chunks AS c
       SET state = CASE
               WHEN h.failed AND c.state IN ('sending', 'unknown', 'sent')
                    AND c.delivery IS NULL THEN 'failed'
               WHEN c.state IN ('sending', 'unknown') THEN 'sent'
               ELSE c.state END,
           provider_message_id = coalesce(c.provider_message_id, h.wamid),
           sent_at = CASE WHEN c.state IN ('sending', 'unknown') THEN coalesce(c.sent_at, :now)
                          ELSE c.sent_at END,
           delivery = CASE
               WHEN h.rank = 3 THEN 'read'
               WHEN h.rank = 2 AND c.delivery IS DISTINCT FROM 'read' THEN 'delivered'
               ELSE c.delivery END,
           last_error = CASE
               WHEN h.failed AND c.state IN ('sending', 'unknown', 'sent') AND c.delivery IS NULL
               THEN 'status failed' || coalesce(' code ' || h.code, '')
               ELSE c.last_error END
      FROM hit AS h
     WHERE c.id = h.id
       AND (c.state IN ('sending', 'unknown')
            OR (h.failed AND c.state = 'sent' AND c.delivery IS NULL)
            OR (h.rank = 3 AND c.delivery IS DISTINCT FROM 'read')
            OR (h.rank = 2 AND c.delivery IS NULL))
    RETURNING c.id, c.message_id, c.state
    """
)


@dataclass(frozen=True)
class SignedStatus:
    """A status event and the Meta app whose signature carried it."""

    app_id: int
    status: StatusUpdate


def apply_statuses(session: Session, statuses: Sequence[SignedStatus], *, now: datetime) -> int:
    """Apply a batch of status events in one statement (plus one for the messages whose
    aggregate changed). Several events for the same message collapse to the furthest one."""
    reduced: dict[tuple[int, str, str, str, str | None], list[Any]] = {}
    for item in statuses:
        event = item.status
        rank = DELIVERY_RANK.get(event.status, 0)
        failed = event.status == "failed"
        if not rank and not failed:
            continue
        key = (item.app_id, event.channel, event.account_id, event.message_id, event.callback_data)
        entry = reduced.setdefault(key, [0, False, None])
        entry[0] = max(entry[0], rank)
        if failed:
            entry[1] = True
            entry[2] = event.error_code if entry[2] is None else entry[2]
    if not reduced:
        return 0
    keys = list(reduced)
    rows = session.execute(
        _APPLY_STATUSES,
        {
            "app_ids": [k[0] for k in keys],
            "channels": [k[1] for k in keys],
            "accounts": [k[2] for k in keys],
            "wamids": [k[3] for k in keys],
            "callbacks": [k[4] for k in keys],
            "ranks": [reduced[k][0] for k in keys],
            "failed": [reduced[k][1] for k in keys],
            "codes": [reduced[k][2] for k in keys],
            "now": now,
        },
    ).all()
    refresh_message_status(session, [r.message_id for r in rows if r.state in ("sent", "failed")])
    return len(rows)
