"""Webhook intake: verify, parse, store in one transaction, enqueue after commit.

The caller (the route) owns the transaction: this module only flushes. A 2xx may be returned
only after the session commits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.orm import Session

from core import jobs
from core.errors import BadRequest, Forbidden, Unauthorized
from core.models import utcnow
from webhooks import repository
from webhooks.batcher import StatusBatcher
from webhooks.channels import meta, whatsapp
from webhooks.channels.events import Event, InboundText, StatusUpdate, Unhandled

log = structlog.get_logger()


@dataclass
class IntakeResult:
    stored: list[int] = field(default_factory=list)
    duplicates: int = 0
    statuses: int = 0
    unhandled: int = 0
    unroutable: int = 0


def verify_handshake(session: Session, query: meta.Handshake) -> str:
    tokens = [app.verify_token for app in repository.meta_apps(session)]
    return meta.answer_handshake(query, tokens)


def authenticate(session: Session, body: bytes, signature: str | None) -> repository.AppSecrets:
    apps = repository.meta_apps(session)
    try:
        index = meta.verify_signature(body, signature, [app.app_secret for app in apps])
    except meta.SignatureError as exc:
        log.warning("webhooks.signature_rejected", reason=exc.reason)
        if exc.missing:
            raise Unauthorized(exc.reason) from exc
        raise Forbidden(exc.reason) from exc
    return apps[index]


def decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest("body is not valid JSON", code="invalid_json") from exc


def read_whatsapp(
    session: Session, body: bytes, signature: str | None
) -> tuple[repository.AppSecrets, list[Event]]:
    """Authenticate and parse one delivery (no writes)."""
    app = authenticate(session, body, signature)
    return app, whatsapp.parse(decode(body))


def status_only(events: list[Event]) -> bool:
    """A delivery made only of status events may be group-committed (see webhooks.batcher)."""
    return bool(events) and all(isinstance(e, StatusUpdate) for e in events)


def signed_statuses(
    app: repository.AppSecrets, events: list[Event]
) -> list[repository.SignedStatus]:
    return [repository.SignedStatus(app.id, e) for e in events if isinstance(e, StatusUpdate)]


def intake_whatsapp(session: Session, body: bytes, signature: str | None) -> IntakeResult:
    app, events = read_whatsapp(session, body, signature)
    return store_whatsapp(session, app, events)


def store_whatsapp(
    session: Session, app: repository.AppSecrets, events: list[Event]
) -> IntakeResult:
    """Store the messages and apply the statuses of one delivery in the caller's transaction."""
    result = IntakeResult()
    for event in events:
        if isinstance(event, InboundText):
            _store_text(session, app, event, result)
        elif isinstance(event, StatusUpdate):
            result.statuses += 1
        else:
            _record(session, event, result)
    if result.statuses:
        repository.apply_statuses(session, signed_statuses(app, events), now=utcnow())
    log_received(app, result)
    return result


def apply_status_batch(
    batcher: StatusBatcher, app: repository.AppSecrets, events: list[Event]
) -> IntakeResult:
    """Apply a status-only delivery through the group commit; returns once it is durable."""
    statuses = signed_statuses(app, events)
    batcher.apply(statuses)
    result = IntakeResult(statuses=len(statuses))
    log_received(app, result)
    return result


def log_received(app: repository.AppSecrets, result: IntakeResult) -> None:
    log.info(
        "webhooks.received",
        channel="whatsapp",
        app_id=app.id,
        stored=len(result.stored),
        duplicates=result.duplicates,
        statuses=result.statuses,
        unhandled=result.unhandled,
        unroutable=result.unroutable,
    )


def _record(session: Session, event: Unhandled, result: IntakeResult) -> None:
    result.unhandled += 1
    repository.record_unhandled(
        session,
        channel=event.channel,
        reason=event.reason,
        payload=json.dumps(event.raw, ensure_ascii=False, default=str),
    )


def _store_text(
    session: Session, app: repository.AppSecrets, event: InboundText, result: IntakeResult
) -> None:
    account = repository.channel_account(session, event.channel, event.account_id)
    if account is None or account.meta_app_id != app.id:
        # A valid signature for an account this install does not own: acknowledge, record,
        # count, and do nothing else (a non-2xx would only make Meta retry for days).
        result.unroutable += 1
        repository.record_unhandled(
            session,
            channel=event.channel,
            reason="unroutable",
            payload=json.dumps({"account_id": event.account_id, "message_id": event.message_id}),
        )
        log.warning("webhooks.unroutable", channel=event.channel, account_id=event.account_id)
        return
    contact = repository.contact_id(
        session,
        workspace_id=account.workspace_id,
        channel=event.channel,
        external_id=event.contact_id,
        name=event.contact_name,
    )
    conversation = repository.conversation_id(session, account=account, contact=contact)
    message_id = repository.insert_inbound(
        session,
        workspace_id=account.workspace_id,
        conversation=conversation,
        channel=event.channel,
        provider_message_id=event.message_id,
        provider_ts=event.timestamp,
        body=event.text,
    )
    if message_id is None:
        result.duplicates += 1
        return
    repository.touch_conversation(session, conversation, event.timestamp)
    jobs.enqueue(session, "bots.reply", message_id=message_id)
    result.stored.append(message_id)
