"""Every query of the webhooks package (SQLAlchemy Core on the hot path)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, exists, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from core.crypto import get_keyring
from core.models import (
    ChannelAccount,
    Contact,
    Conversation,
    MediaItem,
    Message,
    MetaApp,
    OptIn,
    OutboundChunk,
    Outcome,
    Reaction,
    Template,
    UnhandledEvent,
)
from webhooks.channels.events import StatusUpdate


@dataclass(frozen=True)
class AppSecrets:
    id: int
    workspace_id: int
    app_secret: str
    verify_token: str
    app_id: str | None = None  # Meta's id of the app (echoes and handover events name it)
    messenger_verify_token: str | None = None
    instagram_verify_token: str | None = None
    instagram_app_secret: str | None = None

    def secret_for(self, channel: str) -> str:
        """The secret that signs ``channel``'s webhooks."""
        if channel == "instagram" and self.instagram_app_secret:
            return self.instagram_app_secret
        return self.app_secret

    def verify_token_for(self, channel: str) -> str:
        """The token ``channel``'s handshake must present."""
        own = {
            "messenger": self.messenger_verify_token,
            "instagram": self.instagram_verify_token,
        }.get(channel)
        return own or self.verify_token


def meta_apps(session: Session) -> list[AppSecrets]:
    rows = session.execute(
        select(
            MetaApp.id,
            MetaApp.workspace_id,
            MetaApp.app_secret,
            MetaApp.verify_token,
            MetaApp.app_id,
            MetaApp.messenger_verify_token,
            MetaApp.instagram_verify_token,
            MetaApp.instagram_app_secret,
        ).order_by(MetaApp.id)
    ).all()
    return [AppSecrets(*r) for r in rows]


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
    return upsert_conversation(
        session,
        workspace_id=account.workspace_id,
        bot_id=account.bot_id,
        account_id=account.id,
        contact=contact,
    )


def upsert_conversation(
    session: Session, *, workspace_id: int, bot_id: int, account_id: int, contact: int
) -> int:
    """The conversation of ``contact`` with the account, created when new."""
    inserted = session.execute(
        insert(Conversation)
        .values(
            workspace_id=workspace_id,
            bot_id=bot_id,
            channel_account_id=account_id,
            contact_id=contact,
        )
        .on_conflict_do_nothing(index_elements=["channel_account_id", "contact_id"])
        .returning(Conversation.id)
    ).scalar()
    if inserted is not None:
        return inserted
    return session.execute(
        select(Conversation.id).where(
            Conversation.channel_account_id == account_id, Conversation.contact_id == contact
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
    body: str | None,
    kind: str = "text",
    content: str | None = None,
) -> int | None:
    """Store one inbound message; None when this provider id was already stored."""
    return session.execute(
        insert(Message)
        .values(
            workspace_id=workspace_id,
            conversation_id=conversation,
            direction="in",
            channel=channel,
            kind=kind,
            provider_message_id=provider_message_id,
            provider_ts=provider_ts,
            body=body,
            content=content,
            status="received",
            attempts=0,
        )
        .on_conflict_do_nothing(index_elements=["channel", "provider_message_id"])
        .returning(Message.id)
    ).scalar()


# --- group-committed inbound messages (webhooks.batcher) ---------------------------------------


@dataclass(frozen=True)
class ThreadKey:
    """A contact of a channel account, as the webhook names it."""

    workspace_id: int
    bot_id: int
    account_id: int
    channel: str
    contact: str  # the contact's id on the channel
    name: str | None = None


_THREADS = text(
    """
    WITH input AS (
        SELECT DISTINCT ON (t.account_id, t.external_id) t.*
          FROM unnest(CAST(:workspaces AS bigint[]), CAST(:bots AS bigint[]),
                      CAST(:accounts AS bigint[]), CAST(:channels AS text[]),
                      CAST(:externals AS text[]), CAST(:names AS bytea[]))
            AS t(workspace_id, bot_id, account_id, channel, external_id, display_name)
    ), new_contacts AS (
        INSERT INTO contacts (workspace_id, channel, external_id, display_name)
        SELECT DISTINCT ON (workspace_id, channel, external_id)
               workspace_id, channel, external_id, display_name
          FROM input
        ON CONFLICT (workspace_id, channel, external_id) DO NOTHING
        RETURNING id, workspace_id, channel, external_id
    ), contact_ids AS (
        SELECT id, workspace_id, channel, external_id FROM new_contacts
        UNION ALL
        SELECT c.id, c.workspace_id, c.channel, c.external_id
          FROM contacts AS c
          JOIN (SELECT DISTINCT workspace_id, channel, external_id FROM input) AS i
            ON c.workspace_id = i.workspace_id AND c.channel = i.channel
           AND c.external_id = i.external_id
    ), pairs AS (
        SELECT i.workspace_id, i.bot_id, i.account_id, i.external_id, ci.id AS contact_id
          FROM input AS i
          JOIN contact_ids AS ci
            ON ci.workspace_id = i.workspace_id AND ci.channel = i.channel
           AND ci.external_id = i.external_id
    ), new_conversations AS (
        INSERT INTO conversations (workspace_id, bot_id, channel_account_id, contact_id)
        SELECT workspace_id, bot_id, account_id, contact_id FROM pairs
        ON CONFLICT (channel_account_id, contact_id) DO NOTHING
        RETURNING id, channel_account_id, contact_id
    ), conversation_ids AS (
        SELECT id, channel_account_id, contact_id FROM new_conversations
        UNION ALL
        SELECT cv.id, cv.channel_account_id, cv.contact_id
          FROM conversations AS cv
          JOIN pairs AS p ON cv.channel_account_id = p.account_id AND cv.contact_id = p.contact_id
    )
    SELECT p.account_id, p.external_id, cv.id AS conversation_id
      FROM pairs AS p
      JOIN conversation_ids AS cv
        ON cv.channel_account_id = p.account_id AND cv.contact_id = p.contact_id
    """
)


def conversation_ids(session: Session, keys: Sequence[ThreadKey]) -> dict[tuple[int, str], int]:
    """``(account id, contact) -> conversation id`` for every key, creating contacts and
    conversations that do not exist yet: one statement for the whole batch.

    Existing rows are read from the statement's snapshot, so a contact or conversation another
    transaction inserted concurrently is seen by neither half; such keys are then resolved one by
    one with the row-wise upserts."""
    if not keys:
        return {}
    keyring = get_keyring()
    rows = (
        session.connection()
        .execute(
            _THREADS,
            {
                "workspaces": [k.workspace_id for k in keys],
                "bots": [k.bot_id for k in keys],
                "accounts": [k.account_id for k in keys],
                "channels": [k.channel for k in keys],
                "externals": [k.contact for k in keys],
                "names": [None if k.name is None else keyring.encrypt(k.name) for k in keys],
            },
        )
        .all()
    )
    found = {(r.account_id, r.external_id): r.conversation_id for r in rows}
    for k in keys:
        if (k.account_id, k.contact) in found:
            continue
        contact = contact_id(
            session,
            workspace_id=k.workspace_id,
            channel=k.channel,
            external_id=k.contact,
            name=k.name,
        )
        found[(k.account_id, k.contact)] = upsert_conversation(
            session,
            workspace_id=k.workspace_id,
            bot_id=k.bot_id,
            account_id=k.account_id,
            contact=contact,
        )
    return found


@dataclass(frozen=True)
class InboundRow:
    workspace_id: int
    conversation_id: int
    channel: str
    kind: str
    provider_message_id: str
    provider_ts: datetime
    body: str | None
    content: str | None


_INSERT_INBOUND = text(
    """
    WITH input AS (
        SELECT *
          FROM unnest(CAST(:workspaces AS bigint[]), CAST(:conversations AS bigint[]),
                      CAST(:channels AS text[]), CAST(:kinds AS text[]), CAST(:ids AS text[]),
                      CAST(:times AS timestamptz[]), CAST(:bodies AS bytea[]),
                      CAST(:contents AS bytea[]))
               WITH ORDINALITY
            AS t(workspace_id, conversation_id, channel, kind, provider_message_id,
                 provider_ts, body, content, ord)
    ), stored AS (
        INSERT INTO messages (workspace_id, conversation_id, direction, channel, kind,
                              provider_message_id, provider_ts, body, content, status, attempts)
        SELECT workspace_id, conversation_id, 'in', channel, kind, provider_message_id,
               provider_ts, body, content, 'received', 0
          FROM input
         ORDER BY ord
        ON CONFLICT (channel, provider_message_id) DO NOTHING
        RETURNING id, conversation_id, channel, provider_message_id, provider_ts
    ), touched AS (
        UPDATE conversations AS cv
           SET last_inbound_at = greatest(cv.last_inbound_at, s.at)
          FROM (SELECT conversation_id, max(provider_ts) AS at FROM stored
                 GROUP BY conversation_id) AS s
         WHERE cv.id = s.conversation_id
    )
    SELECT id, channel, provider_message_id FROM stored
    """
)


def insert_inbound_many(session: Session, rows: Sequence[InboundRow]) -> dict[tuple[str, str], int]:
    """Store inbound messages in arrival order and open their conversations' windows, in one
    statement. Returns ``(channel, provider message id) -> id`` for the rows stored; the others
    were stored before (duplicates). The caller passes each provider id once."""
    if not rows:
        return {}
    keyring = get_keyring()
    stored = (
        session.connection()
        .execute(
            _INSERT_INBOUND,
            {
                "workspaces": [r.workspace_id for r in rows],
                "conversations": [r.conversation_id for r in rows],
                "channels": [r.channel for r in rows],
                "kinds": [r.kind for r in rows],
                "ids": [r.provider_message_id for r in rows],
                "times": [r.provider_ts for r in rows],
                "bodies": [None if r.body is None else keyring.encrypt(r.body) for r in rows],
                "contents": [
                    None if r.content is None else keyring.encrypt(r.content) for r in rows
                ],
            },
        )
        .all()
    )
    return {(r.channel, r.provider_message_id): r.id for r in stored}


def touch_conversation(session: Session, conversation: int, at: datetime) -> None:
    """Open the messaging window at ``at``; it never moves back (deliveries come out of order)."""
    session.execute(
        update(Conversation)
        .where(Conversation.id == conversation)
        .values(last_inbound_at=func.greatest(Conversation.last_inbound_at, at))
    )


def record_unhandled(session: Session, *, channel: str, reason: str, payload: str) -> None:
    session.add(UnhandledEvent(channel=channel, reason=reason[:64], payload=payload))


def app_secret_for_account(session: Session, channel: str, external_id: str) -> str | None:
    """The secret that signs webhooks for a channel account (the sandbox signs with it): the
    Meta app's, or for Instagram the app's Instagram secret when it has one — the same choice
    the Instagram route verifies with (``AppSecrets.secret_for``)."""
    row = session.execute(
        select(MetaApp.app_secret, MetaApp.instagram_app_secret)
        .join(ChannelAccount, ChannelAccount.meta_app_id == MetaApp.id)
        .where(ChannelAccount.channel == channel, ChannelAccount.external_id == external_id)
    ).first()
    if row is None:
        return None
    if channel == "instagram" and row.instagram_app_secret:
        return str(row.instagram_app_secret)
    return str(row.app_secret)


# --- intake of every event kind --------------------------------------------------------------


def routed_account(
    session: Session, *, channel: str, external_id: str, meta_app_id: int
) -> ChannelAccount | None:
    """The channel account ``external_id`` if the Meta app that signed the webhook owns it."""
    account = channel_account(session, channel, external_id)
    if account is None or account.meta_app_id != meta_app_id:
        return None
    return account


def find_conversation(session: Session, *, account: ChannelAccount, contact: str) -> int | None:
    """The conversation of ``account`` with the contact whose channel id is ``contact``."""
    return session.execute(
        select(Conversation.id)
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(
            Conversation.channel_account_id == account.id,
            Contact.channel == account.channel,
            Contact.external_id == contact,
        )
    ).scalar()


def settle_at_intake(
    session: Session, *, inbound_id: int, conversation: int, kind: str, detail: str
) -> bool:
    """Give a just-stored inbound message its one outcome (it gets no reply job); the message's
    status mirrors it. False when it already had one."""
    done = session.execute(
        insert(Outcome)
        .values(inbound_id=inbound_id, conversation_id=conversation, kind=kind, detail=detail)
        .on_conflict_do_nothing(index_elements=["inbound_id"])
        .returning(Outcome.inbound_id)
    ).scalar()
    if done is None:
        return False
    session.execute(update(Message).where(Message.id == inbound_id).values(status=kind))
    return True


def edit_inbound(
    session: Session,
    *,
    conversation: int,
    channel: str,
    provider_message_id: str,
    body: str | None,
    content: str | None,
) -> int | None:
    """Replace an inbound message's text with its edit; the redacted copy is cleared so it is
    screened again before any prompt uses it. A deleted message stays deleted."""
    return session.execute(
        update(Message)
        .where(
            Message.conversation_id == conversation,
            Message.channel == channel,
            Message.provider_message_id == provider_message_id,
            Message.direction == "in",
            Message.kind != "deleted",
        )
        .values(body=body, body_redacted=None, content=content)
        .returning(Message.id)
    ).scalar()


def erase_inbound(
    session: Session, *, conversation: int, channel: str, provider_message_id: str
) -> int | None:
    """The contact deleted (unsent) a message: its body, redacted copy and content are erased
    and its kind becomes ``deleted``, so it leaves memory and prompts; downloaded media of it
    are deleted too. Idempotent."""
    erased: int | None = session.execute(
        update(Message)
        .where(
            Message.conversation_id == conversation,
            Message.channel == channel,
            Message.provider_message_id == provider_message_id,
            Message.direction == "in",
        )
        .values(body=None, body_redacted=None, content=None, kind="deleted")
        .returning(Message.id)
    ).scalar()
    if erased is not None:
        session.execute(delete(MediaItem).where(MediaItem.message_id == erased))
    return erased


def message_by_provider_id(
    session: Session, *, conversation: int, channel: str, provider_message_id: str
) -> int | None:
    return session.execute(
        select(Message.id).where(
            Message.conversation_id == conversation,
            Message.channel == channel,
            Message.provider_message_id == provider_message_id,
        )
    ).scalar()


def upsert_reaction(
    session: Session,
    *,
    workspace_id: int,
    conversation: int,
    channel: str,
    target: str,
    message_id: int | None,
    emoji: str | None,
    reaction: str | None,
    removed: bool,
    at: datetime,
) -> None:
    """Keep the newest reaction per target message (a redelivery or an older event is a no-op)."""
    stmt = insert(Reaction).values(
        workspace_id=workspace_id,
        conversation_id=conversation,
        channel=channel,
        target_provider_message_id=target,
        message_id=message_id,
        emoji=emoji,
        reaction=reaction,
        removed=removed,
        reacted_at=at,
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["conversation_id", "target_provider_message_id"],
            set_={
                "emoji": stmt.excluded.emoji,
                "reaction": stmt.excluded.reaction,
                "removed": stmt.excluded.removed,
                "reacted_at": stmt.excluded.reacted_at,
                "message_id": func.coalesce(stmt.excluded.message_id, Reaction.message_id),
            },
            where=Reaction.reacted_at <= stmt.excluded.reacted_at,
        )
    )


def insert_human_outbound(
    session: Session,
    *,
    workspace_id: int,
    conversation: int,
    channel: str,
    provider_message_id: str,
    provider_ts: datetime,
    body: str | None,
    content: str | None,
) -> int | None:
    """A message staff sent from the Page inbox / Instagram app, as seen in its echo; None when
    already stored."""
    return session.execute(
        insert(Message)
        .values(
            workspace_id=workspace_id,
            conversation_id=conversation,
            direction="out",
            channel=channel,
            kind="human",
            provider_message_id=provider_message_id,
            provider_ts=provider_ts,
            body=body,
            content=content,
            status="sent",
            attempts=0,
            sent_at=provider_ts,
        )
        .on_conflict_do_nothing(index_elements=["channel", "provider_message_id"])
        .returning(Message.id)
    ).scalar()


def set_mode(session: Session, conversation: int, *, mode: str, at: datetime) -> None:
    session.execute(
        update(Conversation)
        .where(Conversation.id == conversation)
        .values(mode=mode, mode_changed_at=at)
    )


def flag_conversation(session: Session, conversation: int, *, reason: str) -> None:
    session.execute(
        update(Conversation).where(Conversation.id == conversation).values(flagged=reason)
    )


def chunk_of_provider_id(session: Session, *, channel: str, provider_message_id: str) -> int | None:
    return session.execute(
        select(OutboundChunk.id).where(
            OutboundChunk.channel == channel,
            OutboundChunk.provider_message_id == provider_message_id,
        )
    ).scalar()


@dataclass(frozen=True)
class UnresolvedChunk:
    id: int
    body: str
    state: str
    since: datetime | None


def unresolved_chunks(session: Session, conversation: int) -> list[UnresolvedChunk]:
    """Chunks of the conversation whose send has no answer yet (``sending`` / ``unknown``)."""
    rows = session.execute(
        select(
            OutboundChunk.id, OutboundChunk.body, OutboundChunk.state, OutboundChunk.sending_since
        ).where(
            OutboundChunk.conversation_id == conversation,
            OutboundChunk.state.in_(["sending", "unknown"]),
        )
    ).all()
    return [UnresolvedChunk(*r) for r in rows]


def is_our_chunk_key(session: Session, *, conversation: int, key: str) -> bool:
    """Whether ``key`` (an echo's ``metadata``) is the idempotency key of one of our sends in
    this conversation: staff replying from the Page inbox never carry one."""
    return (
        session.execute(
            select(OutboundChunk.id).where(
                OutboundChunk.idempotency_key == key, OutboundChunk.conversation_id == conversation
            )
        ).first()
        is not None
    )


def settle_echoed_chunk(
    session: Session,
    *,
    conversation: int,
    provider_message_id: str,
    now: datetime,
    key: str | None = None,
    chunk_id: int | None = None,
) -> int | None:
    """An echo of our own send proves the chunk went out: an ``unknown`` chunk (named by its
    idempotency key or id) becomes ``sent`` with the echo's message id."""
    if key is None and chunk_id is None:
        return None
    condition = (
        OutboundChunk.idempotency_key == key if key is not None else OutboundChunk.id == chunk_id
    )
    row = session.execute(
        update(OutboundChunk)
        .where(
            condition,
            OutboundChunk.conversation_id == conversation,
            OutboundChunk.state == "unknown",
        )
        .values(
            state="sent",
            provider_message_id=func.coalesce(
                OutboundChunk.provider_message_id, provider_message_id
            ),
            sent_at=func.coalesce(OutboundChunk.sent_at, now),
            last_error=None,
        )
        .returning(OutboundChunk.message_id)
    ).first()
    if row is None:
        return None
    refresh_message_status(session, [row.message_id])
    return int(row.message_id)


def advance_delivery(
    session: Session,
    *,
    conversation: int,
    delivery: str,
    up_to: datetime | None = None,
    provider_message_ids: Sequence[str] = (),
    through_provider_message_id: str | None = None,
) -> int:
    """Move sent chunks of the conversation forward to ``delivered`` or ``read`` (never back):
    those sent at or before ``up_to`` (a Messenger watermark, compared with our send time),
    those named in ``provider_message_ids``, and the one named by
    ``through_provider_message_id`` with every chunk before it (Instagram ``read.mid``)."""
    selectors = []
    if up_to is not None:
        selectors.append(OutboundChunk.sent_at <= up_to)
    if provider_message_ids:
        selectors.append(OutboundChunk.provider_message_id.in_(list(provider_message_ids)))
    if through_provider_message_id is not None:
        last = (
            select(OutboundChunk.id)
            .where(
                OutboundChunk.conversation_id == conversation,
                OutboundChunk.provider_message_id == through_provider_message_id,
            )
            .scalar_subquery()
        )
        selectors.append(OutboundChunk.id <= last)
    if not selectors:
        return 0
    condition: ColumnElement[bool] = OutboundChunk.delivery.is_(None)
    if delivery == "read":
        condition = condition | (OutboundChunk.delivery == "delivered")
    matched = selectors[0]
    for extra in selectors[1:]:
        matched = matched | extra
    return len(
        session.execute(
            update(OutboundChunk)
            .where(
                OutboundChunk.conversation_id == conversation,
                OutboundChunk.state == "sent",
                condition,
                matched,
            )
            .values(delivery=delivery)
            .returning(OutboundChunk.id)
        ).all()
    )


def set_marketing_preference(session: Session, contact: int, *, stop: bool, at: datetime) -> None:
    """WhatsApp ``user_preferences``: ``stop`` opts the contact out of marketing messages and of
    bot messages (``opted_out_at``, which the pipeline honours); ``resume`` clears both."""
    if stop:
        values: dict[str, Any] = {
            "marketing_opted_out_at": func.coalesce(Contact.marketing_opted_out_at, at),
            "opted_out_at": func.coalesce(Contact.opted_out_at, at),
        }
    else:
        values = {"marketing_opted_out_at": None, "opted_out_at": None}
    session.execute(update(Contact).where(Contact.id == contact).values(**values))


def upsert_template(
    session: Session,
    *,
    meta_app_id: int,
    waba_id: str,
    name: str,
    language: str,
    template_id: str | None,
    status: str,
    reason: str | None,
    at: datetime | None,
) -> None:
    """Record a template's review state; an older event never overwrites a newer one."""
    stmt = insert(Template).values(
        meta_app_id=meta_app_id,
        waba_id=waba_id,
        name=name,
        language=language,
        template_id=template_id,
        status=status,
        reason=reason,
        status_at=at,
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["meta_app_id", "waba_id", "name", "language"],
            set_={
                "status": stmt.excluded.status,
                "reason": stmt.excluded.reason,
                "status_at": stmt.excluded.status_at,
                "template_id": func.coalesce(stmt.excluded.template_id, Template.template_id),
            },
            where=(Template.status_at.is_(None))
            | (stmt.excluded.status_at.is_(None))
            | (Template.status_at <= stmt.excluded.status_at),
        )
    )


def upsert_optin(session: Session, *, values: dict[str, Any]) -> None:
    """Keep the newest opt-in per (channel account, subject, topic)."""
    stmt = insert(OptIn).values(**values)
    updated = {k: getattr(stmt.excluded, k) for k in values if k not in ("subject", "topic")}
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["channel_account_id", "subject", "topic"],
            set_=updated,
            where=OptIn.opted_at <= stmt.excluded.opted_at,
        )
    )


def app_id_for_account(session: Session, channel: str, external_id: str) -> str | None:
    """Meta's id of the app that owns a channel account (the sandbox names it in echoes)."""
    return session.execute(
        select(MetaApp.app_id)
        .join(ChannelAccount, ChannelAccount.meta_app_id == MetaApp.id)
        .where(ChannelAccount.channel == channel, ChannelAccount.external_id == external_id)
    ).scalar()


def page_account_channel(session: Session, external_id: str) -> str | None:
    """``messenger`` or ``instagram``: the channel of a page-style account (the sandbox)."""
    return session.execute(
        select(ChannelAccount.channel)
        .where(
            ChannelAccount.external_id == external_id,
            ChannelAccount.channel.in_(["messenger", "instagram"]),
        )
        .order_by(ChannelAccount.channel)
        .limit(1)
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
    reply_to_id: int | None = None  # the inbound message this answers (None: proactive)
    reply_to_provider_id: str | None = None  # its wamid / mid, for reply context


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


_answered = aliased(Message)


# The send lane's per-chunk statements are built once (bound parameters), so a send does not
# pay for building and hashing them again.
_OUTBOUND = (
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
        Message.reply_to_id,
        _answered.provider_message_id.label("reply_to_provider_id"),
    )
    .join(Conversation, Conversation.id == Message.conversation_id)
    .join(ChannelAccount, ChannelAccount.id == Conversation.channel_account_id)
    .join(Contact, Contact.id == Conversation.contact_id)
    .outerjoin(_answered, _answered.id == Message.reply_to_id)
    .where(Message.id == bindparam("message_id"), Message.direction == "out")
)


def outbound(session: Session, message_id: int) -> Outbound | None:
    row = session.execute(_OUTBOUND, {"message_id": message_id}).first()
    return None if row is None else Outbound(**row._mapping)


@dataclass(frozen=True)
class ToSend:
    """:func:`outbound` with what the send job's first transaction needs to know besides."""

    message: Outbound
    earlier_unfinished: bool  # see earlier_unfinished()
    has_chunks: bool  # the message was cut into chunks by an earlier run


_earlier = aliased(Message)
_OUTBOUND_TO_SEND = _OUTBOUND.add_columns(
    exists()
    .where(
        _earlier.conversation_id == Message.conversation_id,
        _earlier.direction == "out",
        _earlier.id < Message.id,
        _earlier.status.in_(["pending", "sending"]),
    )
    .label("earlier_unfinished"),
    exists().where(OutboundChunk.message_id == Message.id).label("has_chunks"),
)


def outbound_to_send(session: Session, message_id: int) -> ToSend | None:
    """:func:`outbound`, :func:`earlier_unfinished` and whether it has chunks, in one round
    trip."""
    row = session.execute(_OUTBOUND_TO_SEND, {"message_id": message_id}).first()
    if row is None:
        return None
    values = dict(row._mapping)
    earlier, has_chunks = values.pop("earlier_unfinished"), values.pop("has_chunks")
    return ToSend(Outbound(**values), bool(earlier), bool(has_chunks))


def account_status(session: Session, account_id: int) -> str:
    return session.execute(
        select(ChannelAccount.status).where(ChannelAccount.id == account_id)
    ).scalar_one()


def create_chunks(session: Session, message: Outbound, parts: Sequence[str]) -> list[Chunk]:
    """One row per part; idempotent (a second run inserts nothing). Returns the message's
    chunks in order."""
    inserted = session.execute(
        _CREATE_CHUNKS,
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
        ],
    ).all()
    if len(inserted) != len(parts):
        return chunks(session, message.message_id)  # some existed already
    return sorted((Chunk(*row) for row in inserted), key=lambda c: c.idx)


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


# Core on the table (no ORM bulk insert), built once; RETURNING rows of an executemany come back
# in one round trip (insertmanyvalues).
_CREATE_CHUNKS = (
    insert(OutboundChunk.metadata.tables["outbound_chunks"])
    .on_conflict_do_nothing(index_elements=["message_id", "idx"])
    .returning(*_CHUNK_COLUMNS)
)


def chunk_ids(session: Session, message_id: int) -> list[int]:
    return list(
        session.execute(
            select(OutboundChunk.id)
            .where(OutboundChunk.message_id == message_id)
            .order_by(OutboundChunk.idx)
        ).scalars()
    )


_CHUNKS = (
    select(*_CHUNK_COLUMNS)
    .where(OutboundChunk.message_id == bindparam("message_id"))
    .order_by(OutboundChunk.idx)
)
_CHUNK = select(*_CHUNK_COLUMNS).where(OutboundChunk.id == bindparam("chunk_id"))


def chunks(session: Session, message_id: int) -> list[Chunk]:
    rows = session.execute(_CHUNKS, {"message_id": message_id}).all()
    return [Chunk(*row) for row in rows]


def chunk(session: Session, chunk_id: int) -> Chunk:
    row = session.execute(_CHUNK, {"chunk_id": chunk_id}).one()
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
    claimed = claim(session, chunk_id, now=now, resend=resend)
    return None if claimed is None else claimed.attempts


def _claim_statement(*, resend: bool) -> Any:
    condition = (
        (OutboundChunk.state == "unknown") & (OutboundChunk.resent.is_(False))
        if resend
        else OutboundChunk.state == "pending"
    )
    values: dict[str, Any] = {
        "state": "sending",
        "sending_since": bindparam("now"),
        "attempts": OutboundChunk.attempts + 1,
    }
    if resend:
        values["resent"] = True
    return (
        update(OutboundChunk)
        .where(OutboundChunk.id == bindparam("chunk_id"), condition)
        .values(**values)
        .returning(*_CHUNK_COLUMNS)
    )


_CLAIM = {resend: _claim_statement(resend=resend) for resend in (False, True)}


def claim(session: Session, chunk_id: int, *, now: datetime, resend: bool = False) -> Chunk | None:
    """:func:`claim_chunk`, returning the claimed chunk as it now is (None: another run changed
    it first)."""
    row = session.execute(_CLAIM[resend], {"chunk_id": chunk_id, "now": now}).first()
    return None if row is None else Chunk(*row)


_MARK_SENT = (
    update(OutboundChunk)
    .where(OutboundChunk.id == bindparam("chunk_id"), OutboundChunk.state == "sending")
    .values(
        state="sent",
        provider_message_id=bindparam("provider_message_id"),
        sent_at=bindparam("now"),
        last_error=None,
    )
    .returning(OutboundChunk.id)
)


def mark_sent(
    session: Session, chunk_id: int, *, provider_message_id: str | None, now: datetime
) -> bool:
    params = {"chunk_id": chunk_id, "provider_message_id": provider_message_id, "now": now}
    return session.execute(_MARK_SENT, params).first() is not None


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


@dataclass(frozen=True)
class TypingTarget:
    """An inbound message to mark read / answer with a typing indicator."""

    message_id: int
    channel: str
    provider_message_id: str | None
    received_at: datetime
    account_id: int
    account: str
    account_status: str
    access_token: str
    recipient: str


def typing_target(session: Session, message_id: int) -> TypingTarget | None:
    row = session.execute(
        select(
            Message.id.label("message_id"),
            ChannelAccount.channel,
            Message.provider_message_id,
            Message.created_at.label("received_at"),
            ChannelAccount.id.label("account_id"),
            ChannelAccount.external_id.label("account"),
            ChannelAccount.status.label("account_status"),
            ChannelAccount.access_token,
            Contact.external_id.label("recipient"),
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(ChannelAccount, ChannelAccount.id == Conversation.channel_account_id)
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(Message.id == message_id, Message.direction == "in")
    ).first()
    return None if row is None else TypingTarget(**row._mapping)


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
    rows = (
        session.connection()
        .execute(
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
        )
        .all()
    )
    refresh_message_status(session, [r.message_id for r in rows if r.state in ("sent", "failed")])
    return len(rows)
