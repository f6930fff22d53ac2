"""The media job: download the attachments of an inbound ``media`` message and store them
encrypted.

Contract with intake: a message stored with ``kind='media'`` carries its attachments in the
encrypted ``content`` JSON (``{"media": [{"kind", "media_id", "url", "mime_type", …}, …]}``);
``maintenance.fetch_media`` with its ``message_id`` (maintenance lane, by ``core.celery_app``
ROUTES) then

1. creates one ``media`` row per attachment once (``INSERT … ON CONFLICT (message_id, idx) DO
   NOTHING``, state ``pending``) and commits;
2. downloads every ``pending`` attachment with no transaction open, through
   :mod:`webhooks.media` under ``MediaPolicy.from_settings()``: WhatsApp media ids in two steps
   with the channel account's token and the configured Graph API URL and version, Messenger and
   Instagram attachment URLs directly (no token). Only media kinds are fetched; links
   (``fallback``, ``share``, ``template``, …) are recorded ``refused``;
3. settles each row with a conditional UPDATE from ``pending``: ``stored`` (encrypted bytes, MIME
   type, size, SHA-256), ``refused`` (the guard, an integrity check or the size cap: never
   retried), ``failed`` (an error status no retry can fix). A retryable failure (timeout, 429,
   5xx) keeps its row ``pending`` and raises, so ``core.jobs`` backs the job off; the rows
   already settled stay settled. The job is completed in the transaction that settles the last
   row, so a re-run finds nothing pending and changes nothing.

After the last attempt the job is dead-lettered and its still-pending rows become ``failed``.
The job never answers the user: the conversation lane decides what the model sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core import jobs
from core.config import get_settings
from core.db import session_scope
from core.models import ChannelAccount, Conversation, MediaItem, Message, utcnow
from webhooks.media import (
    Media,
    MediaError,
    MediaPolicy,
    MediaRefused,
    MediaTooLarge,
    MediaUnavailable,
    fetch_attachment,
    fetch_whatsapp_media,
)

log = structlog.get_logger()

TASK = "maintenance.fetch_media"
# Attachment kinds that are files; anything else (links, shared posts, templates) is not fetched.
FETCHABLE_KINDS = frozenset({"image", "video", "audio", "document", "file", "sticker"})
_ERROR_MAX = 200


@dataclass(frozen=True)
class _Item:
    idx: int
    kind: str
    media_id: str | None
    url: str | None
    mime_type: str | None


@dataclass(frozen=True)
class _Plan:
    channel: str
    token: str | None
    pending: tuple[_Item, ...]


@dataclass(frozen=True)
class _Settled:
    idx: int
    state: str  # stored | refused | failed
    media: Media | None = None
    error: str | None = None


def attachments(content: str | None) -> list[_Item]:
    """The attachments listed in a message's ``content`` JSON, in order (empty when none)."""
    if not content:
        return []
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        return []
    raw = data.get("media") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        return []
    items: list[_Item] = []
    for idx, entry in enumerate(raw):
        if not isinstance(entry, dict):
            entry = {}
        items.append(
            _Item(
                idx=idx,
                kind=_text(entry.get("kind")) or "attachment",
                media_id=_text(entry.get("media_id")),
                url=_text(entry.get("url")),
                mime_type=_text(entry.get("mime_type")),
            )
        )
    return items


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _plan(session: Session, message_id: int) -> _Plan | None:
    """Create the message's media rows once; the attachments still pending (None: nothing to
    fetch for this message)."""
    row = session.execute(
        select(Message, ChannelAccount.access_token)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(ChannelAccount, ChannelAccount.id == Conversation.channel_account_id)
        .where(Message.id == message_id)
    ).first()
    if row is None:
        return None
    message, token = row
    if message.kind != "media" or message.direction != "in":
        return None
    items = attachments(message.content)
    if not items:
        return None
    session.execute(
        insert(MediaItem)
        .values(
            [
                {
                    "workspace_id": message.workspace_id,
                    "message_id": message.id,
                    "idx": item.idx,
                    "kind": item.kind[:16],
                    "mime_type": item.mime_type[:255] if item.mime_type else None,
                    "state": "pending",
                }
                for item in items
            ]
        )
        .on_conflict_do_nothing(index_elements=["message_id", "idx"])
    )
    pending = set(
        session.scalars(
            select(MediaItem.idx).where(
                MediaItem.message_id == message_id, MediaItem.state == "pending"
            )
        )
    )
    return _Plan(
        channel=message.channel,
        token=token,
        pending=tuple(item for item in items if item.idx in pending),
    )


def _fetch(item: _Item, plan: _Plan, policy: MediaPolicy) -> Media:
    settings = get_settings()
    if plan.channel == "whatsapp":
        if not item.media_id:
            raise MediaUnavailable("no media id", retryable=False)
        if not plan.token:
            raise MediaUnavailable("no access token", retryable=False)
        return fetch_whatsapp_media(
            item.media_id,
            token=plan.token,
            graph_url=settings.graph_api_url,
            version=settings.graph_api_version,
            policy=policy,
        )
    if not item.url:
        raise MediaUnavailable("no attachment url", retryable=False)
    return fetch_attachment(item.url, policy=policy)


def _settle_one(item: _Item, plan: _Plan, policy: MediaPolicy) -> _Settled:
    """Download one attachment; raises ``MediaUnavailable`` only when a retry may help."""
    if item.kind not in FETCHABLE_KINDS:
        return _Settled(item.idx, "refused", error="not a media file")
    try:
        media = _fetch(item, plan, policy)
    except (MediaRefused, MediaTooLarge) as exc:
        return _Settled(item.idx, "refused", error=_reason(exc))
    except MediaUnavailable as exc:
        if exc.retryable:
            raise
        return _Settled(item.idx, "failed", error=_reason(exc))
    except MediaError as exc:
        return _Settled(item.idx, "failed", error=_reason(exc))
    return _Settled(item.idx, "stored", media=media)


def _reason(exc: MediaError) -> str:
    if isinstance(exc, MediaTooLarge):
        return f"too large (limit {exc.limit} bytes)"
    return f"{type(exc).__name__}: {exc}"[:_ERROR_MAX]


def _record(session: Session, message_id: int, settled: _Settled) -> None:
    values: dict[str, Any] = {"state": settled.state, "error": settled.error}
    if settled.media is not None:
        values.update(
            content=settled.media.content,
            mime_type=settled.media.mime_type[:255],
            size=settled.media.size,
            sha256=settled.media.sha256,
            fetched_at=utcnow(),
        )
    session.execute(
        update(MediaItem)
        .where(
            MediaItem.message_id == message_id,
            MediaItem.idx == settled.idx,
            MediaItem.state == "pending",
        )
        .values(**values)
    )


def fetch_media(*, job_id: int, message_id: int) -> None:
    """The body of ``maintenance.fetch_media`` (see the module docstring)."""
    with session_scope() as session:
        plan = _plan(session, message_id)
        if plan is None or not plan.pending:
            if not jobs.complete(session, job_id):
                raise jobs.AlreadyDone
            return
    policy = MediaPolicy.from_settings()
    settled: list[_Settled] = []
    retry: MediaUnavailable | None = None
    for item in plan.pending:
        try:
            settled.append(_settle_one(item, plan, policy))
        except MediaUnavailable as exc:
            retry = retry or exc
    with session_scope() as session:
        for result in settled:
            _record(session, message_id, result)
        if retry is None and not jobs.complete(session, job_id):
            raise jobs.AlreadyDone
    for result in settled:
        log.info(
            "webhooks.media_settled",
            message_id=message_id,
            idx=result.idx,
            state=result.state,
            size=result.media.size if result.media else None,
            error=result.error,
        )
    if retry is not None:
        raise retry


def give_up(session: Session, *, job_id: int, message_id: int, **_: Any) -> None:
    """Dead-letter hook: the attachments still pending are ``failed``."""
    session.execute(
        update(MediaItem)
        .where(MediaItem.message_id == message_id, MediaItem.state == "pending")
        .values(state="failed", error="gave up after the last attempt")
    )


fetch_media_task = jobs.job(TASK, on_dead=give_up)(fetch_media)
