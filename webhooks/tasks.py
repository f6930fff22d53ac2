"""The send lane: deliver stored replies to the Graph API, one outbound row at a time.

The reply is already stored (by the conversations lane) before this runs, so a retry re-sends the
same text. Status moves ``pending → sending → sent | failed`` by conditional UPDATEs only.
"""

from __future__ import annotations

from typing import Any

import httpx
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import jobs
from core.config import get_settings
from core.crypto import get_keyring
from core.db import session_scope
from core.models import ChannelAccount, Contact, Conversation, Message, utcnow
from webhooks.channels import whatsapp

log = structlog.get_logger()

_client: httpx.Client | None = None


def http_client() -> httpx.Client:
    global _client
    if _client is None:
        settings = get_settings()
        _client = httpx.Client(
            timeout=httpx.Timeout(settings.graph_timeout, connect=5.0), follow_redirects=False
        )
    return _client


class SendRetry(Exception):
    """The Graph API did not take the message; the job is retried with back-off."""


def _mark_dead(session: Session, *, job_id: int, message_id: int, **_: Any) -> None:
    session.execute(
        update(Message)
        .where(Message.id == message_id, Message.status.in_(["pending", "sending"]))
        .values(status="dead", last_error="send attempts exhausted")
    )


@jobs.job("webhooks.send", on_dead=_mark_dead)
def send(*, job_id: int, message_id: int) -> None:
    settings = get_settings()
    with session_scope() as session:
        row = session.execute(
            select(
                Message.status,
                Message.body,
                Message.conversation_id,
                ChannelAccount.channel,
                ChannelAccount.external_id.label("account"),
                ChannelAccount.access_token,
                Contact.external_id.label("recipient"),
            )
            .join(Conversation, Conversation.id == Message.conversation_id)
            .join(ChannelAccount, ChannelAccount.id == Conversation.channel_account_id)
            .join(Contact, Contact.id == Conversation.contact_id)
            .where(Message.id == message_id)
        ).one()
        if row.status not in ("pending", "sending"):
            if not jobs.complete(session, job_id):
                raise jobs.AlreadyDone
            return
        session.execute(
            update(Message)
            .where(Message.id == message_id, Message.status.in_(["pending", "sending"]))
            .values(status="sending", attempts=Message.attempts + 1)
        )
    path, body = whatsapp.build_text_send(
        phone_number_id=row.account, to=row.recipient, text=row.body or ""
    )
    url = f"{settings.graph_api_url.rstrip('/')}/{settings.graph_api_version}/{path}"
    contact = get_keyring().pseudonym(row.recipient)
    try:
        response = http_client().post(
            url, json=body, headers={"Authorization": f"Bearer {row.access_token}"}
        )
    except httpx.TransportError as exc:
        _back_to_pending(message_id, type(exc).__name__)
        log.warning("send.transport_error", message_id=message_id, error=type(exc).__name__)
        raise SendRetry(type(exc).__name__) from exc
    payload = _json(response)
    if response.is_success:
        with session_scope() as session:
            session.execute(
                update(Message)
                .where(Message.id == message_id, Message.status == "sending")
                .values(
                    status="sent",
                    provider_message_id=whatsapp.sent_message_id(payload),
                    sent_at=utcnow(),
                    last_error=None,
                )
            )
            if not jobs.complete(session, job_id):
                raise jobs.AlreadyDone
        log.info(
            "send.sent", message_id=message_id, conversation_id=row.conversation_id, contact=contact
        )
        return
    verdict = whatsapp.classify_error(response.status_code, payload)
    error = f"graph {response.status_code} {verdict}"
    if verdict == whatsapp.SendErrorClass.RETRY:
        _back_to_pending(message_id, error)
        log.warning("send.retry", message_id=message_id, status=response.status_code)
        raise SendRetry(error)
    with session_scope() as session:
        session.execute(
            update(Message)
            .where(Message.id == message_id, Message.status == "sending")
            .values(status="failed", last_error=error)
        )
        jobs.complete(session, job_id)
    log.error("send.failed", message_id=message_id, status=response.status_code, kind=verdict)


def _back_to_pending(message_id: int, error: str) -> None:
    with session_scope() as session:
        session.execute(
            update(Message)
            .where(Message.id == message_id, Message.status == "sending")
            .values(status="pending", last_error=error)
        )


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
