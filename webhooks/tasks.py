"""The send lane: deliver a stored outbound message to the Graph API as 1..n chunks.

Contract with the conversations lane: it stores an outbound ``Message`` (``status='pending'``,
the full text in ``body``) and enqueues ``webhooks.send`` with its id. This job then

1. creates the message's chunks once (``INSERT … ON CONFLICT (message_id, idx) DO NOTHING``), cut
   at the channel's limit, each with the idempotency key ``"{message_id}:{idx}"``;
2. sends them in order, each only when every earlier outbound message of the conversation is
   finished (otherwise :class:`core.jobs.Defer`), through these gates: the 24-hour window,
   a paused account (one probe per interval), the account's circuit breaker, the workspace's
   in-flight cap and the token buckets (account, and WhatsApp recipient pair);
3. moves each chunk ``pending → sending → sent | failed | dead`` (and ``unknown`` after an
   ambiguous send) with conditional UPDATEs only, and keeps ``messages.status`` the aggregate.

Per channel (meta-channels reference a.5, a.8): WhatsApp ``POST /{phone_number_id}/messages``
(free-form only inside the 24-hour window, reply context ``context.message_id``, correlation
``biz_opaque_callback_data``; a message of kind ``template`` holds the JSON of a template's name,
language and body parameters, goes out as one chunk outside the window too, and only while the
``templates`` row of the account's Meta app says APPROVED — otherwise it fails unsent and the
``window_expired`` outcomes pointing at it say why); Messenger ``POST /{page_id}/messages`` and
Instagram ``POST /{ig_id}/messages``, both with the account's token as ``Authorization: Bearer``
and a ``messaging_type`` chosen by :func:`webhooks.channels.messenger.messaging_for` (Messenger
carries the chunk's idempotency key as ``message.metadata``, which its echo returns; Instagram has
no such field and is matched by ``repository.settle_instagram_echo``).

Transactions: the first (the one that counts the job's attempt, see ``core.jobs.run_job``)
reads the message, creates its chunks and takes the first one through its gates, limits and
claim; the answer to the last chunk is recorded together with the job's completion.

Retries have one layer: a retryable failure puts the chunk back to ``pending`` and raises
``Defer`` with capped exponential back-off, full jitter and at least ``Retry-After``; the chunk's
own attempt counter bounds them (``PARLEY_SEND_MAX_ATTEMPTS``). No transaction is open during a
Graph API call.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import jobs
from core.config import Settings, get_settings
from core.crypto import get_keyring
from core.db import session_scope
from core.models import ChannelAccount, Outcome, Template, utcnow
from webhooks import repository
from webhooks.channels import instagram, messenger, meta, whatsapp
from webhooks.channels.text import limit_for, split_text
from webhooks.ratelimit import Bucket, Limits, connect

log = structlog.get_logger()

SENDABLE_CHANNELS = frozenset({"whatsapp", "messenger", "instagram"})


@dataclass
class Lane:
    """Per-process send-lane resources, rebuilt when the settings object changes."""

    settings: Settings
    http: httpx.Client
    limits: Limits | None
    rng: random.Random


_lane: Lane | None = None
_lane_lock = threading.Lock()


def lane() -> Lane:
    global _lane
    settings = get_settings()
    with _lane_lock:
        if _lane is None or _lane.settings is not settings:
            http = httpx.Client(
                timeout=httpx.Timeout(
                    settings.graph_timeout, connect=min(5.0, settings.graph_timeout)
                ),
                follow_redirects=False,
            )
            limits = None
            if settings.redis_url:
                limits = Limits(connect(settings.redis_url), settings.redis_prefix)
            _lane = Lane(settings, http, limits, random.SystemRandom())
        return _lane


def backoff_delay(
    attempt: int, *, base: float, cap: float, retry_after: float | None, rng: random.Random
) -> float:
    """Full jitter over a capped exponential window, never before ``Retry-After``."""
    window = min(cap, base * 2 ** max(0, attempt - 1))
    wait = rng.uniform(0, window)
    return wait + retry_after if retry_after is not None else wait


def _finish(session: Session, job_id: int) -> None:
    if not jobs.complete(session, job_id):
        raise jobs.AlreadyDone


def _on_dead(session: Session, *, job_id: int, message_id: int, **_: Any) -> None:
    repository.end_message_chunks(session, message_id, to="dead", error="send attempts exhausted")
    repository.refresh_message_status(session, [message_id])
    repository.end_message(session, message_id, status="dead", error="send attempts exhausted")


@dataclass(frozen=True)
class _Opened:
    """What the send job's first transaction found: the message, its chunks in order, and
    what the gates decided about the first one."""

    message: repository.Outbound
    chunk_ids: list[int]
    first: _Step


def _open(session: Session, *, job_id: int, message_id: int) -> _Opened | None:
    """The send job's first transaction (the one that counts its attempt): read the message,
    cut it into chunks on the first run, and pass the first chunk through its gates and limits
    and claim it. None: there is nothing to send, and the job is marked done. (Should this
    transaction fail to commit after the claim, the workspace slot it took lapses after its
    TTL, like the slot of a worker that died.)"""
    found = repository.outbound_to_send(session, message_id)
    if found is None or found.message.status in repository.MESSAGE_TERMINAL:
        _finish(session, job_id)
        return None
    message = found.message
    if found.has_chunks:
        chunks = repository.chunks(session, message_id)
    else:
        chunks = _create_chunks(session, message)
    if not chunks:
        _finish(session, job_id)
        return None
    read = _Read(chunks[0], found.earlier_unfinished)
    first = _prepare(session, lane(), message, chunks[0].id, read=read)
    return _Opened(message, [c.id for c in chunks], first)


@jobs.job("webhooks.send", on_dead=_on_dead, prepare=_open)
def send(opened: _Opened, *, job_id: int, message_id: int) -> None:
    current, message, step = lane(), opened.message, opened.first
    last = len(opened.chunk_ids) - 1
    for index, chunk_id in enumerate(opened.chunk_ids):
        if index:
            step = _prepare_alone(current, message, chunk_id)
        if isinstance(step, jobs.Defer):
            raise step
        if step is not None and _send_claimed(current, message, step, job_id, last=index == last):
            return  # the last chunk's answer and the job's completion committed together
    with session_scope() as session:
        repository.refresh_message_status(session, [message_id])
        _finish(session, job_id)


def _create_chunks(session: Session, message: repository.Outbound) -> list[repository.Chunk]:
    if message.channel not in SENDABLE_CHANNELS:
        repository.end_message(
            session, message.message_id, status="failed", error="unsupported_channel"
        )
        log.error(
            "send.unsupported_channel", message_id=message.message_id, channel=message.channel
        )
        return []
    if message.kind == "template":
        if message.channel != "whatsapp" or template_of(message.body) is None:
            repository.end_message(
                session, message.message_id, status="failed", error="invalid_template"
            )
            log.error("send.invalid_template", message_id=message.message_id)
            return []
        return repository.create_chunks(session, message, [message.body or ""])
    parts = split_text(message.body or "", limit_for(message.channel))
    if not parts:
        repository.end_message(session, message.message_id, status="failed", error="empty_body")
        log.error("send.empty_body", message_id=message.message_id)
        return []
    return repository.create_chunks(session, message, parts)


@dataclass(frozen=True)
class _Go:
    """The gates let this chunk go: as a resend of an ambiguous send, and/or as the probe of a
    paused account."""

    resend: bool = False
    probe: bool = False
    messaging_type: str | None = None  # Messenger/Instagram
    tag: str | None = None


@dataclass(frozen=True)
class _Read:
    """What the gates' transaction already read: the chunk, and whether an earlier outbound
    message of the conversation is unfinished (the message itself, account status included,
    was read in it too)."""

    chunk: repository.Chunk
    earlier_unfinished: bool


@dataclass(frozen=True)
class _Claimed:
    """A chunk this run moved to ``sending``, with the workspace slot it holds until the Graph
    API answers (``degraded``: the limiters could not be asked)."""

    chunk: repository.Chunk
    go: _Go
    workspace_id: int
    slot: str | None
    degraded: bool


# What the gates and limits decided about a chunk: send it (claimed), wait, or nothing to do.
_Step = _Claimed | jobs.Defer | None


def _prepare(
    session: Session,
    current: Lane,
    message: repository.Outbound,
    chunk_id: int,
    *,
    read: _Read | None = None,
) -> _Step:
    """The chunk's gates and, when they let it go, the limits and its claim
    (``pending → sending``), in the caller's transaction. The Redis limits are asked after the
    gates, so a chunk that has to wait spends no token; writes made here commit even when the
    answer is a deferral."""
    decision = _gate(session, current, message, chunk_id, utcnow(), read=read)
    if not isinstance(decision, _Go):
        return decision
    limited = _take_limits(current, message)
    if isinstance(limited, jobs.Defer):
        return limited
    slot, degraded = limited
    try:
        chunk = repository.claim(session, chunk_id, now=utcnow(), resend=decision.resend)
        if chunk is not None:
            repository.refresh_message_status(session, [message.message_id])
    except BaseException:
        _release_slot(current, message.workspace_id, slot)
        raise
    if chunk is None:
        _release_slot(current, message.workspace_id, slot)
        return jobs.Defer(current.settings.send_order_delay, "chunk_claimed_elsewhere")
    return _Claimed(chunk, decision, message.workspace_id, slot, degraded)


def _prepare_alone(current: Lane, message: repository.Outbound, chunk_id: int) -> _Step:
    """:func:`_prepare` in a transaction of its own."""
    step: _Step = None
    try:
        with session_scope() as session:
            step = _prepare(session, current, message, chunk_id)
    except BaseException:
        _let_go(current, step)
        raise
    return step


def _let_go(current: Lane, step: _Step) -> None:
    """Give back the slot of a claim whose transaction did not commit."""
    if isinstance(step, _Claimed):
        _release_slot(current, step.workspace_id, step.slot)


def _release_slot(current: Lane, workspace_id: int, slot: str | None) -> None:
    if current.limits is not None:
        current.limits.release_slot(workspace_id, slot)


def _gate(
    session: Session,
    current: Lane,
    message: repository.Outbound,
    chunk_id: int,
    now: datetime,
    *,
    read: _Read | None = None,
) -> _Go | jobs.Defer | None:
    """Decide in one transaction whether the chunk may go. None: it is finished (or was just
    finished here). Writes made here commit even when the answer is a deferral. ``read``: what
    this transaction already read (otherwise the gates read it)."""
    settings = current.settings
    chunk = read.chunk if read is not None else repository.chunk(session, chunk_id)
    log_ids = {"chunk_id": chunk_id, "message_id": message.message_id}
    if chunk.state in repository.CHUNK_TERMINAL:
        return None
    if chunk.state == "sending":
        started = chunk.sending_since or now
        if now - started <= timedelta(seconds=settings.graph_timeout + 15.0):
            return jobs.Defer(settings.send_order_delay, "chunk_in_flight")
        # The run that sent it died before recording the answer: the send may have happened.
        repository.move_chunk(
            session, chunk_id, from_states=["sending"], to="unknown", error="send interrupted"
        )
        log.warning("send.interrupted", **log_ids)
        chunk = replace(chunk, state="unknown")
    resend = False
    if chunk.state == "unknown":
        waited = (now - (chunk.sending_since or now)).total_seconds()
        if waited < settings.send_unknown_grace:
            return jobs.Defer(settings.send_unknown_grace - waited, "awaiting_status_webhook")
        if chunk.resent:
            repository.move_chunk(
                session,
                chunk_id,
                from_states=["unknown"],
                to="dead",
                error="unconfirmed after resend",
            )
            repository.end_message_chunks(
                session, message.message_id, to="dead", error="earlier chunk unconfirmed"
            )
            repository.refresh_message_status(session, [message.message_id])
            log.error("send.unconfirmed", **log_ids)
            return None
        resend = True
    if (
        read.earlier_unfinished
        if read is not None
        else repository.earlier_unfinished(
            session, conversation_id=message.conversation_id, message_id=message.message_id
        )
    ):
        return jobs.Defer(settings.send_order_delay, "earlier_message_unfinished")
    if message.kind == "template":
        refusal = _template_refusal(session, message)
        if refusal is not None:
            _refuse_template(session, message, chunk_id, refusal, from_state=chunk.state)
            return None
    messaging = _messaging(message, now, settings)
    if messaging is None:
        _expire(session, message)
        return None
    if chunk.attempts >= settings.send_max_attempts:
        _give_up(
            session, message, chunk_id, "send attempts exhausted", to="dead", from_state=chunk.state
        )
        return None
    probe = False
    status = (
        message.account_status
        if read is not None
        else repository.account_status(session, message.account_id)
    )
    if status == "paused":
        interval = settings.send_paused_probe_interval
        if current.limits is None or not current.limits.claim_probe(
            message.account_id, interval=interval
        ):
            return jobs.Defer(interval * current.rng.uniform(0.5, 1.0), "account_paused")
        probe = True
        log.info("send.probe", account_id=message.account_id, **log_ids)
    return _Go(resend=resend, probe=probe, messaging_type=messaging[0], tag=messaging[1])


def _messaging(
    message: repository.Outbound, now: datetime, settings: Settings
) -> tuple[str | None, str | None] | None:
    """``(messaging_type, tag)`` for the channel's rules at ``now``; None: the window is closed.

    WhatsApp: free-form only inside the window (no messaging type). Messenger and Instagram:
    RESPONSE / UPDATE inside it, MESSAGE_TAG + HUMAN_AGENT for a person's message until
    ``send_human_agent_hours``; a bot message never gets a tag."""
    if message.channel == "whatsapp":
        if message.kind == "template":
            return None, None  # templates are what WhatsApp delivers outside the window
        return None if _window_closed(message.last_inbound_at, now, settings) else (None, None)
    since = None if message.last_inbound_at is None else now - message.last_inbound_at
    return messenger.messaging_for(
        kind=message.kind,
        is_reply=message.reply_to_id is not None,
        since_user=since,
        window=timedelta(hours=settings.send_window_hours),
        human_window=timedelta(hours=settings.send_human_agent_hours),
    )


@dataclass(frozen=True)
class TemplateSend:
    """What an outbound message of kind ``template`` holds in its body (as JSON)."""

    name: str
    language: str
    waba_id: str | None
    parameters: tuple[str, ...]


def template_of(body: str | None) -> TemplateSend | None:
    """The template a ``template`` message names; None when its body is not one."""
    try:
        data = json.loads(body or "")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    name, language, waba_id = data.get("name"), data.get("language"), data.get("waba_id")
    parameters = data.get("parameters") or []
    if (
        not isinstance(name, str)
        or not name
        or not isinstance(language, str)
        or not language
        or (waba_id is not None and not isinstance(waba_id, str))
        or not isinstance(parameters, list)
        or not all(isinstance(p, str) for p in parameters)
    ):
        return None
    return TemplateSend(name, language, waba_id, tuple(parameters))


def _template_refusal(session: Session, message: repository.Outbound) -> str | None:
    """Why this template must not be sent (None: it is APPROVED for the account's Meta app)."""
    template = template_of(message.body)
    if template is None:
        return "invalid template message"
    query = (
        select(Template.status)
        .join(ChannelAccount, ChannelAccount.meta_app_id == Template.meta_app_id)
        .where(
            ChannelAccount.id == message.account_id,
            Template.name == template.name,
            Template.language == template.language,
        )
    )
    if template.waba_id is not None:
        query = query.where(Template.waba_id == template.waba_id)
    statuses = set(session.execute(query).scalars())
    label = f"template {template.name} ({template.language})"
    if "APPROVED" in statuses:
        return None
    if not statuses:
        return f"{label} is unknown: no status webhook received"
    return f"{label} is {', '.join(sorted(statuses))}, not APPROVED"


def _refuse_template(
    session: Session, message: repository.Outbound, chunk_id: int, reason: str, *, from_state: str
) -> None:
    """Fail the template message unsent; the messages it stood for say why."""
    _give_up(session, message, chunk_id, reason, to="failed", from_state=from_state)
    session.execute(
        update(Outcome)
        .where(Outcome.reply_id == message.message_id)
        .values(kind="window_expired", detail=f"template not sent: {reason}")
    )
    log.warning(
        "send.template_refused",
        message_id=message.message_id,
        conversation_id=message.conversation_id,
        reason=reason,
    )


def _window_closed(last_inbound_at: datetime | None, now: datetime, settings: Settings) -> bool:
    if last_inbound_at is None:
        return True
    return now - last_inbound_at > timedelta(hours=settings.send_window_hours)


def _expire(session: Session, message: repository.Outbound) -> None:
    repository.end_message_chunks(session, message.message_id, to="dead", error="window_expired")
    if not repository.any_chunk_sent(session, message.message_id):
        repository.expire_replies(session, message.message_id)
    repository.refresh_message_status(session, [message.message_id])
    log.warning(
        "send.window_expired",
        message_id=message.message_id,
        conversation_id=message.conversation_id,
    )


def _give_up(
    session: Session,
    message: repository.Outbound,
    chunk_id: int,
    error: str,
    *,
    to: str,
    from_state: str,
) -> None:
    """End this chunk and the rest of its message: a reply missing a middle part is not sent on."""
    repository.move_chunk(session, chunk_id, from_states=[from_state], to=to, error=error)
    repository.end_message_chunks(session, message.message_id, to=to, error=f"earlier chunk {to}")
    repository.refresh_message_status(session, [message.message_id])


def _take_limits(
    current: Lane, message: repository.Outbound
) -> tuple[str | None, bool] | jobs.Defer:
    """The account's breaker, a workspace slot and a token from each bucket: the slot held
    and whether the limiters were unreachable (degraded), or how long to wait."""
    settings = current.settings
    limits = current.limits
    if limits is None:
        return None, False
    allowed = limits.breaker_allow(message.account_id, cooldown=settings.send_breaker_cooldown)
    if not allowed.allowed:
        return jobs.Defer(allowed.wait + current.rng.uniform(0, 1.0), "breaker_open")
    slot, held = limits.acquire_slot(
        message.workspace_id,
        cap=settings.send_workspace_concurrency,
        ttl=settings.graph_timeout + 5.0,
    )
    if not held.allowed:
        return jobs.Defer(held.wait + current.rng.uniform(0, 0.2), "workspace_busy")
    taken = limits.take(_buckets(limits, message, settings))
    if not taken.allowed:
        limits.release_slot(message.workspace_id, slot)
        return jobs.Defer(taken.wait + current.rng.uniform(0, 0.05), "rate_limited")
    return slot, allowed.degraded or held.degraded or taken.degraded


def _send_claimed(
    current: Lane, message: repository.Outbound, claimed: _Claimed, job_id: int, *, last: bool
) -> bool:
    """Send a claimed chunk; True when its answer was recorded together with the job's
    completion (``last``: it is the message's last chunk)."""
    try:
        if claimed.degraded:
            time.sleep(current.settings.send_degraded_delay)
        return _attempt(current, message, claimed, job_id if last else None)
    finally:
        _release_slot(current, claimed.workspace_id, claimed.slot)


def _buckets(limits: Limits, message: repository.Outbound, settings: Settings) -> list[Bucket]:
    rate = {
        "whatsapp": settings.send_rate_whatsapp,
        "messenger": settings.send_rate_messenger,
        "instagram": settings.send_rate_instagram,
    }.get(message.channel, settings.send_rate_messenger)
    buckets = [limits.account_bucket(message.account_id, rate)]
    if message.channel == "whatsapp" and settings.send_pair_interval > 0:
        buckets.append(
            limits.pair_bucket(
                message.account_id,
                get_keyring().pseudonym(message.recipient),
                settings.send_pair_interval,
                settings.send_pair_burst,
            )
        )
    return buckets


def _attempt(
    current: Lane, message: repository.Outbound, claimed: _Claimed, job_id: int | None
) -> bool:
    """POST the claimed chunk and record the answer; True when the job was marked done with
    it (``job_id``: the chunk is the message's last)."""
    settings = current.settings
    chunk, go = claimed.chunk, claimed.go
    chunk_id, attempts = chunk.id, chunk.attempts
    log_ids = {
        "chunk_id": chunk_id,
        "message_id": message.message_id,
        "conversation_id": message.conversation_id,
        "account_id": message.account_id,
    }
    path, body = build_request(
        message, chunk, go, messenger_reply_context=settings.messenger_reply_context
    )
    url = graph_url(settings, message.channel, path)
    try:
        response = current.http.post(
            url, json=body, headers={"Authorization": f"Bearer {message.access_token}"}
        )
    except httpx.TransportError as exc:
        if meta.classify_transport_error(exc) == meta.AMBIGUOUS:
            _ambiguous(current, message, chunk_id, type(exc).__name__, log_ids)
        error = meta.SendError(meta.RETRY, 0, None)
        _retry(
            current, message, chunk_id, attempts, error, type(exc).__name__, log_ids, breaker=True
        )
        return False
    payload = _json(response)
    if response.is_success:
        provider_id = sent_message_id(message.channel, payload)
        return _sent(current, message, chunk_id, provider_id, go, log_ids, job_id=job_id)
    error = meta.classify_error(response.status_code, payload, response.headers.get("retry-after"))
    if error.kind == meta.RETRY:
        _retry(
            current,
            message,
            chunk_id,
            attempts,
            error,
            error.describe(),
            log_ids,
            breaker=response.status_code >= 500,
        )
    elif error.kind == meta.CREDENTIALS:
        _credentials(current, message, chunk_id, error, log_ids)
    else:
        with session_scope() as session:
            _give_up(
                session, message, chunk_id, error.describe(), to="failed", from_state="sending"
            )
        log.error(
            "send.failed", status=error.status, code=error.code, subcode=error.subcode, **log_ids
        )
        if error.alert:
            log.error("send.account_alert", code=error.code, account_id=message.account_id)
    return False


def graph_url(settings: Settings, channel: str, path: str) -> str:
    base = settings.graph_api_url
    if channel == "instagram" and settings.instagram_graph_api_url:
        base = settings.instagram_graph_api_url
    return f"{base.rstrip('/')}/{settings.graph_api_version}/{path}"


def build_request(
    message: repository.Outbound,
    chunk: repository.Chunk,
    go: _Go,
    *,
    messenger_reply_context: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The Graph API path (after the version) and JSON body of one chunk's send.

    Reply context goes only on a reply's first chunk: WhatsApp always, Messenger when
    ``messenger_reply_context`` is on (its shape is unconfirmed), Instagram never."""
    if message.channel == "whatsapp" and message.kind == "template":
        template = template_of(chunk.body)
        if template is None:
            raise ValueError(f"message {message.message_id} is not a valid template message")
        return whatsapp.build_template_send(
            phone_number_id=message.account,
            to=message.recipient,
            name=template.name,
            language=template.language,
            parameters=template.parameters,
            callback_data=chunk.idempotency_key,
        )
    if message.channel == "whatsapp":
        return whatsapp.build_text_send(
            phone_number_id=message.account,
            to=message.recipient,
            text=chunk.body,
            reply_to=message.reply_to_provider_id if chunk.idx == 0 else None,
            callback_data=chunk.idempotency_key,
        )
    messaging_type = go.messaging_type or messenger.RESPONSE
    if message.channel == "messenger":
        return messenger.build_text_send(
            page_id=message.account,
            recipient=message.recipient,
            text=chunk.body,
            messaging_type=messaging_type,
            tag=go.tag,
            metadata=chunk.idempotency_key,
            reply_to=(
                message.reply_to_provider_id if messenger_reply_context and chunk.idx == 0 else None
            ),
        )
    if message.channel == "instagram":
        return instagram.build_text_send(
            account_id=message.account,
            recipient=message.recipient,
            text=chunk.body,
            messaging_type=messaging_type,
            tag=go.tag,
        )
    raise ValueError(f"no send API for channel {message.channel!r}")


def sent_message_id(channel: str, payload: Any) -> str | None:
    if channel == "whatsapp":
        return whatsapp.sent_message_id(payload)
    return messenger.sent_message_id(payload)


def _sent(
    current: Lane,
    message: repository.Outbound,
    chunk_id: int,
    provider_id: str | None,
    go: _Go,
    log_ids: dict[str, int],
    *,
    job_id: int | None = None,
) -> bool:
    """Record the accepted send; with ``job_id`` (the last chunk) the job is marked done in the
    same transaction. The send is recorded even when another run finished the job first."""
    with session_scope() as session:
        recorded = repository.mark_sent(
            session, chunk_id, provider_message_id=provider_id, now=utcnow()
        )
        resumed = go.probe and repository.set_account_status(
            session, message.account_id, status="active", was="paused"
        )
        repository.refresh_message_status(session, [message.message_id])
        done = job_id is not None and jobs.complete(session, job_id)
    if current.limits is not None and current.limits.breaker_success(message.account_id):
        log.info("send.breaker_closed", account_id=message.account_id)
    if resumed:
        log.warning("send.account_resumed", account_id=message.account_id)
    log.info("send.sent", resent=go.resend, recorded=recorded, **log_ids)
    if job_id is not None and not done:
        raise jobs.AlreadyDone
    return done


def _retry(
    current: Lane,
    message: repository.Outbound,
    chunk_id: int,
    attempts: int,
    error: meta.SendError,
    reason: str,
    log_ids: dict[str, int],
    *,
    breaker: bool,
) -> None:
    settings = current.settings
    if breaker and current.limits is not None:
        opened = current.limits.breaker_failure(
            message.account_id,
            threshold=settings.send_breaker_failures,
            cooldown=settings.send_breaker_cooldown,
        )
        if opened:
            log.warning("send.breaker_open", account_id=message.account_id)
    if attempts >= settings.send_max_attempts:
        with session_scope() as session:
            _give_up(
                session,
                message,
                chunk_id,
                f"{reason} (attempts exhausted)",
                to="dead",
                from_state="sending",
            )
        log.error("send.dead", attempts=attempts, **log_ids)
        return
    with session_scope() as session:
        repository.move_chunk(
            session, chunk_id, from_states=["sending"], to="pending", error=reason
        )
        repository.refresh_message_status(session, [message.message_id])
    delay = backoff_delay(
        attempts,
        base=settings.send_backoff_base,
        cap=settings.send_backoff_cap,
        retry_after=error.retry_after,
        rng=current.rng,
    )
    log.warning(
        "send.retry", status=error.status, code=error.code, retry_in=round(delay, 3), **log_ids
    )
    raise jobs.Defer(delay, "graph_retry")


def _ambiguous(
    current: Lane,
    message: repository.Outbound,
    chunk_id: int,
    reason: str,
    log_ids: dict[str, int],
) -> None:
    settings = current.settings
    with session_scope() as session:
        repository.move_chunk(
            session, chunk_id, from_states=["sending"], to="unknown", error=f"ambiguous {reason}"
        )
    if current.limits is not None:
        current.limits.breaker_failure(
            message.account_id,
            threshold=settings.send_breaker_failures,
            cooldown=settings.send_breaker_cooldown,
        )
    log.warning("send.ambiguous", error=reason, **log_ids)
    raise jobs.Defer(settings.send_unknown_grace, "awaiting_status_webhook")


def _credentials(
    current: Lane,
    message: repository.Outbound,
    chunk_id: int,
    error: meta.SendError,
    log_ids: dict[str, int],
) -> None:
    settings = current.settings
    with session_scope() as session:
        repository.move_chunk(
            session,
            chunk_id,
            from_states=["sending"],
            to="pending",
            error=error.describe(),
            refund=True,
        )
        paused = repository.set_account_status(
            session, message.account_id, status="paused", was="active"
        )
        repository.refresh_message_status(session, [message.message_id])
    if paused:
        log.error("send.account_paused", code=error.code, **log_ids)
    interval = settings.send_paused_probe_interval
    raise jobs.Defer(interval * current.rng.uniform(0.5, 1.0), "account_paused")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


# --- mark as read and typing indicator --------------------------------------------------------


def typing_requests(
    target: repository.TypingTarget, *, typing: bool
) -> list[tuple[str, dict[str, Any]]]:
    """The requests that mark ``target`` read and (with ``typing``) show the typing indicator:
    one for WhatsApp (read status with ``typing_indicator``), ``mark_seen`` then ``typing_on``
    for Messenger and Instagram."""
    if target.channel == "whatsapp":
        if not target.provider_message_id:
            return []
        return [
            whatsapp.build_mark_read(
                phone_number_id=target.account,
                message_id=target.provider_message_id,
                typing=typing,
            )
        ]
    actions = ["mark_seen", "typing_on"] if typing else ["mark_seen"]
    if target.channel == "messenger":
        return [
            messenger.build_sender_action(
                page_id=target.account, recipient=target.recipient, action=action
            )
            for action in actions
        ]
    if target.channel == "instagram":
        return [
            instagram.build_sender_action(
                account_id=target.account, recipient=target.recipient, action=action
            )
            for action in actions
        ]
    return []


def _typing_target(
    session: Session, *, job_id: int, message_id: int
) -> repository.TypingTarget | None:
    """In the attempt's transaction: the message to mark read, with the job marked done (it is
    never retried). None: there is nothing to send."""
    target = repository.typing_target(session, message_id)
    _finish(session, job_id)
    if target is None or target.channel not in SENDABLE_CHANNELS:
        return None
    return target


@jobs.job("webhooks.send_typing", prepare=_typing_target)
def send_typing(target: repository.TypingTarget, *, job_id: int, message_id: int) -> None:
    """Best effort: mark an inbound message read and show the typing indicator. Each request is
    tried at most twice (a retryable answer or a connection that never opened gets one more
    try); nothing is deferred, nothing raised, so it never holds anything up. Routed to the
    ``send`` lane by its name (``webhooks.send*``)."""
    current = lane()
    settings = current.settings
    if target.account_status != "active":
        log.info("typing.skipped", reason="account_paused", message_id=message_id)
        return
    age = (utcnow() - target.received_at).total_seconds()
    requests = typing_requests(target, typing=age <= settings.typing_max_age)
    headers = {"Authorization": f"Bearer {target.access_token}"}
    for path, body in requests:
        url = graph_url(settings, target.channel, path)
        for attempt in (1, 2):
            outcome = _post_best_effort(current, url, body, headers)
            if outcome is None:
                break
            if attempt == 1 and outcome.kind == meta.RETRY:
                time.sleep(settings.typing_retry_delay)
                continue
            log.warning(
                "typing.failed",
                message_id=message_id,
                account_id=target.account_id,
                status=outcome.status,
                code=outcome.code,
                kind=outcome.kind,
            )
            if outcome.kind == meta.CREDENTIALS:
                return  # the send lane pauses the account when a reply hits the same error
            break


def _post_best_effort(
    current: Lane, url: str, body: dict[str, Any], headers: dict[str, str]
) -> meta.SendError | None:
    """None on success; otherwise the error's class (an ambiguous transport error counts as
    never: a read receipt or typing indicator twice is harmless but not worth a second try)."""
    try:
        response = current.http.post(url, json=body, headers=headers)
    except httpx.TransportError as exc:
        kind = meta.RETRY if meta.classify_transport_error(exc) == meta.NOT_SENT else meta.NEVER
        return meta.SendError(kind, 0, None)
    if response.is_success:
        return None
    return meta.classify_error(
        response.status_code, _json(response), response.headers.get("retry-after")
    )
