"""The reply pipeline, run by the ``conversations`` lane.

A ``bots.reply`` job names one inbound message, but the work is per conversation: the job takes
the conversation's lease and answers every pending message of it, oldest first (provider
timestamp, then arrival), one turn at a time. A burst of messages that arrive within the bot's
burst window is answered once, with all of it in the prompt. Each turn:

policy (blocked, opt-out/opt-in, "talk to a human", human mode, limits, 24-hour window)
→ screen in (PII → placeholders) → memory → model → screen out → ONE transaction: the reply,
an outcome row for every message it answers, and the send job (and, when no message of the
conversation is left pending, the lease's release and the job's completion).

Transactions of a message answered at once: the attempt count (``core.jobs``); the first turn
up to the model (the lease is taken here, with the reads and the screening); the reply.

Invariants: every inbound message ends with exactly one ``outcomes`` row (primary key
``inbound_id``); no transaction is open while the model runs; a write made under the lease
re-checks it, so a worker paused past its lease cannot answer a conversation another worker
took over; the reply is stored before it is sent, so a redelivered task re-sends the stored text.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from bots import lease, memory, repository
from bots.policy import Policy, asks_for_human, detect_language, is_command, policy_of
from core import jobs
from core.config import get_settings
from core.db import session_scope
from core.models import (
    Bot,
    Contact,
    Conversation,
    MediaItem,
    Message,
    Notice,
    Outcome,
    utcnow,
)
from core.models.media import image_parts
from inference import (
    BadRequest,
    ContextTooLong,
    GenerationParams,
    InferenceClient,
    Timeout,
    Unavailable,
    parse_endpoints,
)
from moderation import canary_instruction, make_canary, screen_inbound, screen_outbound

log = structlog.get_logger()


class LeaseLost(Exception):
    """Another worker took the conversation over (this one was paused past its lease)."""


def inference_client() -> InferenceClient:
    """One client (and connection pool) per process and endpoint configuration."""
    settings = get_settings()
    return _client_for(
        settings.inference_endpoints or "",
        settings.inference_timeout,
        settings.inference_connect_timeout,
    )


@lru_cache(maxsize=4)
def _client_for(spec: str, timeout: float, connect_timeout: float) -> InferenceClient:
    return InferenceClient(
        parse_endpoints(spec) if spec else [], timeout=timeout, connect_timeout=connect_timeout
    )


def lease_seconds() -> float:
    """Longer than one model call can take, so a live worker never loses its lease."""
    return get_settings().inference_timeout * 1.5 + 15


def _request_id(message_id: int, variant: str = "") -> str:
    """A stable UUID per message (and variant), so a retried request is recognisable in logs."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"parley:message:{message_id}:{variant}").hex


# --- the job ------------------------------------------------------------------------------------


def _mark_dead(session: Session, *, job_id: int, message_id: int, **_: Any) -> None:
    row = repository.message_conversation(session, message_id)
    if row is None or row[1]:
        return
    session.execute(
        insert(Outcome)
        .values(
            inbound_id=message_id, conversation_id=row[0], kind="dead", detail="attempts exhausted"
        )
        .on_conflict_do_nothing()
    )
    session.execute(update(Message).where(Message.id == message_id).values(status="dead"))


@dataclass
class Run:
    """One run of a ``bots.reply`` job. ``holds_lease`` is true while the conversation's lease
    is committed to this run, so that leaving early (an error, a deferral) gives it back.
    ``done_elsewhere``: the transaction that ended the run found the job already finished by
    another run (its own writes, made under the lease, still commit)."""

    job_id: int
    message_id: int
    holder: str
    conversation_id: int | None = None
    holds_lease: bool = False
    done_elsewhere: bool = False

    def ended(self) -> bool:
        """After the commit of the transaction that ended the run."""
        self.holds_lease = False
        if self.done_elsewhere:
            raise jobs.AlreadyDone
        return True


@jobs.job("bots.reply", on_dead=_mark_dead)
def reply(*, job_id: int, message_id: int) -> None:
    run = Run(job_id, message_id, holder=f"{job_id}-{uuid.uuid4().hex[:12]}")
    try:
        while not _turn(run):
            pass
    except LeaseLost as exc:
        raise jobs.Defer(1.0, "lease lost") from exc
    finally:
        if run.holds_lease and run.conversation_id is not None:
            with session_scope() as session:
                lease.release(session, run.conversation_id, run.holder)


def _take(session: Session, run: Run) -> bool:
    """The first step of a run, in the transaction of its first turn: take the lease of the
    job's conversation. False when the message already has its outcome (the job is then marked
    done in this transaction)."""
    taken = lease.acquire_for_message(session, run.message_id, run.holder, lease_seconds())
    if taken is None:
        found = repository.message_conversation(session, run.message_id)
        if found is None or found[1]:
            _complete(session, run)
            return False
        # The holder answers every pending message before it lets go; the jobs of a busy
        # conversation only need to look again, spread out so they do not poll in step.
        raise jobs.Defer(1.0 + random.random() * 2, "conversation busy")  # noqa: S311  # jitter
    run.conversation_id = taken
    return True


def _complete(session: Session, run: Run) -> None:
    run.done_elsewhere = not jobs.complete(session, run.job_id)


def _end_turn(session: Session, run: Run) -> bool:
    """Close a turn that wrote under the lease, in its transaction: re-check the lease (rolling
    the turn back when another worker has the conversation now) and, when no message of the
    conversation is left without an outcome, release it and mark the job done (the job's own
    message is one of them). True when that ended the run; False: another turn is needed."""
    assert run.conversation_id is not None
    held, released = lease.end_turn(session, run.conversation_id, run.holder)
    if not held:
        raise LeaseLost
    if released:
        _complete(session, run)
    return released


# --- one turn -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    """What a turn needs from the database to ask the model."""

    conversation_id: int
    workspace_id: int
    channel: str
    batch: list[int]
    newest_ts: datetime
    oldest_created: datetime
    language: str | None
    memory: memory.Context
    params: GenerationParams
    model: str | None
    canary: str
    system_prompt: str
    fallback: str
    user_text: str
    policy: Policy
    first_reply: bool
    images: tuple[dict[str, Any], ...] = ()


def _turn(run: Run) -> bool:
    """Handle the oldest pending message(s) of the conversation. True when the run is over."""
    with session_scope() as session:
        step = _look(session, run, utcnow())
    if step is True:
        return run.ended()
    # Committed: the lease is this run's until a turn ends the run (and releases it).
    run.holds_lease = True
    if isinstance(step, Draft):
        return _answer(step, run)
    return False


def _look(session: Session, run: Run, now: datetime) -> Draft | bool:
    """One turn up to the model: settle what the rules settle, or return the draft to ask the
    model about. True when the run is over, False when another turn is needed."""
    if run.conversation_id is None and not _take(session, run):
        return True
    assert run.conversation_id is not None
    ctx = repository.turn_context(
        session,
        run.conversation_id,
        messages_since=now - timedelta(minutes=1),
        tokens_since=_day_start(now),
    )
    pending = repository.pending_inbound(session, run.conversation_id)
    if not pending:
        lease.release(session, run.conversation_id, run.holder)
        _complete(session, run)
        return True
    policy = policy_of(ctx.bot.extra)
    if policy.burst_window_seconds > 0:
        newest_arrival = max(m.created_at for m in pending)
        wait = policy.burst_window_seconds - (now - newest_arrival).total_seconds()
        if wait > 0:
            raise jobs.Defer(wait, "burst window open")
    _screen(session, pending, ctx.contact)
    if _apply_policy(session, ctx, pending, policy, now):
        return _end_turn(session, run)
    pending, images = _notice_unanswerable(session, ctx, pending, policy)
    if not pending:
        return _end_turn(session, run)
    draft = _draft(session, ctx, pending, policy, images)
    # Best effort, on the send lane: mark the message read and show "typing…" while the
    # model works (never retried more than once, never holds up the reply).
    jobs.enqueue(session, "webhooks.send_typing", message_id=draft.batch[-1])
    return draft


def _screen(session: Session, pending: Sequence[Message], contact: Contact) -> None:
    for message in pending:
        if message.body_redacted is None and message.body is not None:
            verdict = screen_inbound(message.body)
            message.body_redacted = verdict.redacted
            message.verdict = {"reasons": list(verdict.reasons), "action": verdict.action}
            message.language = detect_language(message.body)
            if message.language:
                contact.language = message.language
    session.flush()


def _check_lease(session: Session, conversation_id: int, holder: str) -> None:
    if not lease.still_held(session, conversation_id, holder):
        raise LeaseLost


def _settle(
    session: Session,
    conversation_id: int,
    batch: Sequence[Message] | Sequence[int],
    kind: str,
    *,
    reply_id: int | None = None,
    detail: str | None = None,
) -> None:
    """One outcome per message of the batch, or nothing (the caller's transaction rolls back).
    A message that no longer exists needs none."""
    ids = [m if isinstance(m, int) else m.id for m in batch]
    found, written = repository.settle(
        session, conversation_id, ids, kind, reply_id=reply_id, detail=detail
    )
    if written != found:
        raise LeaseLost  # another run settled some of them: roll back and look again


def _notice(
    session: Session,
    conversation: Conversation,
    kind: str,
    episode: str,
    text: str,
    *,
    channel: str,
) -> int | None:
    """Queue a fixed text at most once per conversation and episode; returns its message id."""
    notice_id = session.execute(
        insert(Notice)
        .values(conversation_id=conversation.id, kind=kind, episode=episode)
        .on_conflict_do_nothing()
        .returning(Notice.id)
    ).scalar()
    if notice_id is None:
        return None
    message = Message(
        workspace_id=conversation.workspace_id,
        conversation_id=conversation.id,
        direction="out",
        channel=channel,
        kind="notice",
        body=text,
        body_redacted=text,
        status="pending",
        attempts=0,
        verdict={"notice": kind},
    )
    session.add(message)
    session.flush()
    session.execute(update(Notice).where(Notice.id == notice_id).values(message_id=message.id))
    jobs.enqueue(session, "webhooks.send", message_id=message.id)
    log.info("pipeline.notice", conversation_id=conversation.id, kind=kind, message_id=message.id)
    return message.id


def _day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def _apply_policy(
    session: Session,
    ctx: repository.TurnContext,
    pending: list[Message],
    policy: Policy,
    now: datetime,
) -> bool:
    """Settle the batch without the model when a rule says so; True when it did."""
    conversation, contact = ctx.conversation, ctx.contact
    channel = pending[0].channel
    lang = contact.language
    first = pending[0]
    if contact.blocked_at is not None:
        _settle(session, conversation.id, pending, "blocked", detail="contact blocked")
        return True
    stop = next((m for m in pending if is_command(m.body or "", policy.opt_out_keywords)), None)
    if stop is not None:
        if contact.opted_out_at is None:
            contact.opted_out_at = now
            _notice(
                session,
                conversation,
                "opt_out",
                f"opt_out:{stop.id}",
                policy.notice("opt_out", lang),
                channel=channel,
            )
        _settle(session, conversation.id, pending, "opted_out")
        return True
    if contact.opted_out_at is not None:
        if is_command(first.body or "", policy.opt_in_keywords):
            contact.opted_out_at = None
            _notice(
                session,
                conversation,
                "opt_in",
                f"opt_in:{first.id}",
                policy.notice("opt_in", lang),
                channel=channel,
            )
            _settle(session, conversation.id, [first], "notice", detail="opted in")
        else:
            _settle(session, conversation.id, pending, "opted_out")
        return True
    if any(asks_for_human(m.body or "", policy.human_keywords) for m in pending):
        conversation.mode, conversation.mode_changed_at = "human", now
        conversation.flagged = "human_requested"
        _notice(
            session,
            conversation,
            "human",
            f"human:{pending[-1].id}",
            policy.notice("human", lang),
            channel=channel,
        )
        _settle(session, conversation.id, pending, "human_mode", detail="asked for a human")
        return True
    if conversation.mode != "bot":
        last_human = repository.last_human_message_at(session, conversation.id)
        since = (
            max(t for t in (conversation.mode_changed_at, last_human) if t is not None)
            if (conversation.mode_changed_at or last_human)
            else now
        )
        idle = timedelta(minutes=policy.human_idle_timeout_minutes)
        if conversation.mode == "human" and now - since >= idle:
            conversation.mode, conversation.mode_changed_at = "bot", now
            log.info("pipeline.human_mode_expired", conversation_id=conversation.id)
        else:
            _settle(session, conversation.id, pending, "human_mode", detail=conversation.mode)
            return True
    if _over_limits(session, ctx, pending, policy, now):
        return True
    newest = max(m.provider_ts or m.created_at for m in pending)
    if now - newest > timedelta(hours=policy.window_hours):
        _window_expired(session, conversation, pending)
        return True
    return False


def _window_expired(session: Session, conversation: Conversation, pending: list[Message]) -> None:
    """Settle a batch the window closed on: with the bot's WhatsApp window template queued (at
    most once per conversation and newest message; the send lane sends it only while it is
    APPROVED), or with nothing sent when the bot has none."""
    bot = session.get(Bot, conversation.bot_id)
    template = (bot.extra if bot is not None else {}).get("window_template")
    if not isinstance(template, dict) or pending[0].channel != "whatsapp":
        _settle(session, conversation.id, pending, "window_expired")
        return
    body = json.dumps(
        {
            "name": template["name"],
            "language": template["language"],
            "waba_id": template.get("waba_id"),
            "parameters": list(template.get("parameters") or []),
        },
        ensure_ascii=False,
    )
    message_id = _notice(
        session,
        conversation,
        "template",
        f"template:{pending[-1].id}",
        body,
        channel=pending[0].channel,
    )
    if message_id is None:
        _settle(session, conversation.id, pending, "window_expired", detail="template already sent")
        return
    session.execute(update(Message).where(Message.id == message_id).values(kind="template"))
    _settle(
        session,
        conversation.id,
        pending,
        "window_expired",
        reply_id=message_id,
        detail=f"template sent: {template['name']}",
    )


# Message kinds the model cannot take yet: answered with a notice (images reach the model once
# a bot has a vision endpoint).
UNANSWERABLE = {"media": "media", "unsupported": "unsupported"}


def _notice_unanswerable(
    session: Session, ctx: repository.ConversationContext, pending: list[Message], policy: Policy
) -> tuple[list[Message], list[dict[str, Any]]]:
    """Settle media and unsupported messages with one localized notice per kind and turn, except
    images the bot's vision endpoint can look at. Returns the messages left for the model and
    the image content parts that go with them."""
    images: list[dict[str, Any]] = []
    if vision_available():
        kept: list[Message] = []
        for message in (m for m in pending if m.kind == "media"):
            parts = _image_parts_of(session, message)
            if parts:
                images.extend(parts)
                kept.append(message)
        pending = [m for m in pending if m.kind != "media" or m in kept]
        unanswerable = [m for m in pending if m.kind in UNANSWERABLE and m not in kept]
    else:
        unanswerable = [m for m in pending if m.kind in UNANSWERABLE]
    for kind, notice in UNANSWERABLE.items():
        batch = [m for m in unanswerable if m.kind == kind]
        if batch:
            _notice(
                session,
                ctx.conversation,
                notice,
                f"{notice}:{batch[0].id}",
                policy.notice(notice, ctx.contact.language),
                channel=batch[0].channel,
            )
            _settle(session, ctx.conversation.id, batch, "notice", detail=f"{kind} not answered")
    return [m for m in pending if m not in unanswerable], images


MEDIA_WAIT_SECONDS = 60.0


def _image_parts_of(session: Session, message: Message) -> list[dict[str, Any]]:
    """The message's downloaded images as ``image_url`` parts; waits (Defer) while a download
    is still running, up to :data:`MEDIA_WAIT_SECONDS` after the message arrived."""
    rows = list(
        session.scalars(
            select(MediaItem).where(MediaItem.message_id == message.id).order_by(MediaItem.idx)
        )
    )
    young = (utcnow() - message.created_at).total_seconds() < MEDIA_WAIT_SECONDS
    if young and (not rows or any(r.state == "pending" for r in rows)):
        raise jobs.Defer(1.0, "media downloading")
    return [
        image_parts(r.mime_type or "", r.content)
        for r in rows
        if r.state == "stored" and r.content and (r.mime_type or "").startswith("image/")
    ]


@lru_cache(maxsize=4)
def _has_vision(spec: str) -> bool:
    return any(e.role == "vision" for e in parse_endpoints(spec)) if spec else False


def vision_available() -> bool:
    return _has_vision(get_settings().inference_endpoints or "")


def _over_limits(
    session: Session,
    ctx: repository.TurnContext,
    pending: list[Message],
    policy: Policy,
    now: datetime,
) -> bool:
    """The contact's limits, counted by the turn's context query (inbound messages in the last
    minute, tokens since the day began)."""
    conversation, contact = ctx.conversation, ctx.contact
    limits = policy.limits
    day = _day_start(now)
    if ctx.recent_inbound > limits.messages_per_minute:
        episode, detail = f"rate:{now:%Y%m%d%H}", "messages per minute"
    elif ctx.recent_tokens >= limits.tokens_per_day:
        episode, detail = f"tokens:{now:%Y%m%d}", "tokens per day"
    else:
        return False
    _notice(
        session,
        conversation,
        "limit",
        episode,
        policy.notice("limit", contact.language),
        channel=pending[0].channel,
    )
    _settle(session, conversation.id, pending, "limited", detail=detail)
    if (
        repository.notices_since(session, conversation.id, "limit", day)
        >= limits.propose_block_after
    ):
        conversation.flagged = "propose_block"
    return True


def _draft(
    session: Session,
    ctx: repository.TurnContext,
    pending: list[Message],
    policy: Policy,
    images: list[dict[str, Any]] | None = None,
) -> Draft:
    bot = ctx.bot
    canary = make_canary(bot.canary_seed)
    context = memory.load(
        session, bot, ctx.conversation.id, pending, canary_line=canary_instruction(canary)
    )
    return Draft(
        conversation_id=ctx.conversation.id,
        workspace_id=ctx.conversation.workspace_id,
        channel=pending[0].channel,
        batch=[m.id for m in pending],
        newest_ts=max(m.provider_ts or m.created_at for m in pending),
        oldest_created=min(m.created_at for m in pending),
        language=ctx.contact.language,
        memory=context,
        params=GenerationParams(
            temperature=bot.temperature,
            max_tokens=bot.max_tokens,
            top_p=bot.top_p,
            stop=tuple(bot.stop),
            seed=bot.seed,
        ),
        model=bot.model,
        canary=canary,
        system_prompt=bot.system_prompt,
        fallback=bot.fallback_reply,
        user_text="\n".join(m.body or "" for m in pending),
        policy=policy,
        first_reply=policy.disclose_ai and not ctx.has_bot_reply,
        images=tuple(images or ()),
    )


def _ask_model(draft: Draft) -> tuple[str, list[str], int, memory.Prompt]:
    """The model's draft reply, reasons, tokens used and the prompt actually sent (within the
    memory budget; see ``bots.memory``)."""
    client, last = inference_client(), draft.batch[-1]
    prompt = memory.fit(draft.memory, memory.tokenizer())
    if prompt.too_long:
        return "", ["memory.too_long"], 0, prompt
    if draft.images:
        # The newest user turn carries the images; the vision endpoint names its own model.
        *earlier, newest = prompt.messages
        parts = [{"type": "text", "text": newest["content"]}, *draft.images]
        result = client.chat(
            [*earlier, {"role": "user", "content": parts}],
            params=draft.params,
            role="vision",
            request_id=_request_id(last, "vision"),
            conversation_key=draft.conversation_id,
            cache_salt=str(draft.workspace_id),
        )
        tokens = (result.prompt_tokens or 0) + (result.completion_tokens or 0)
        return result.text, [], tokens, memory.served(prompt, result.prompt_tokens)
    try:
        result = client.chat(
            prompt.messages,
            params=draft.params,
            model=draft.model,
            request_id=_request_id(last),
            conversation_key=draft.conversation_id,
            cache_salt=str(draft.workspace_id),
        )
    except ContextTooLong:
        # The server counts more than memory did (a context configured larger than served):
        # the system message and the turn being answered, and the history folds.
        log.warning("pipeline.context_too_long", message_id=last, budget=prompt.budget)
        prompt = memory.shrink(prompt, draft.memory)
        result = client.chat(
            prompt.messages,
            params=draft.params,
            model=draft.model,
            request_id=_request_id(last, "short"),
            conversation_key=draft.conversation_id,
            cache_salt=str(draft.workspace_id),
        )
    except BadRequest as exc:
        log.warning("pipeline.model_rejected", message_id=last, error=str(exc)[:200])
        return "", ["model.bad_request"], 0, prompt
    tokens = (result.prompt_tokens or 0) + (result.completion_tokens or 0)
    return result.text, [], tokens, memory.served(prompt, result.prompt_tokens)


def _answer(draft: Draft, run: Run) -> bool:
    """Ask the model, screen its draft and store the reply; True when that ended the run."""
    try:
        text, reasons, tokens, prompt = _ask_model(draft)
    except (Unavailable, Timeout) as exc:
        _model_down(draft, run, exc)
        raise AssertionError("unreachable") from exc  # _model_down always raises
    verdict = screen_outbound(
        text, canary=draft.canary, user_text=draft.user_text, system_prompt=draft.system_prompt
    )
    reasons = [*reasons, *verdict.reasons]
    allowed = verdict.allowed
    body = verdict.text if allowed else draft.fallback
    redacted = screen_inbound(body).redacted
    with session_scope() as session:
        reply_id = _store_reply(
            session,
            draft,
            body=body,
            redacted=redacted,
            prompt=prompt,
            verdict={
                "reasons": reasons,
                "action": "send" if allowed else "fallback",
                "tokens": tokens,
                **memory.usage(prompt),
            },
        )
        done = _end_turn(session, run)
    if reply_id is not None:
        log.info(
            "pipeline.replied",
            conversation_id=draft.conversation_id,
            reply_id=reply_id,
            answers=len(draft.batch),
            action="send" if allowed else "fallback",
            reasons=reasons,
        )
    return run.ended() if done else False


def _store_reply(
    session: Session,
    draft: Draft,
    *,
    body: str,
    redacted: str,
    prompt: memory.Prompt,
    verdict: dict[str, Any],
) -> int | None:
    """The reply, its outcomes, its send job and the memory fold its prompt asks for (the caller
    re-checks the lease before its transaction commits). None: the window closed while the
    model worked, and the batch is settled as ``window_expired``."""
    if utcnow() - draft.newest_ts > timedelta(hours=draft.policy.window_hours):
        _settle(session, draft.conversation_id, draft.batch, "window_expired")
        return None
    if draft.first_reply and draft.policy.disclose_ai:
        conversation = session.get(Conversation, draft.conversation_id)
        assert conversation is not None
        _notice(
            session,
            conversation,
            "disclosure",
            "first",
            draft.policy.notice("disclosure", draft.language),
            channel=draft.channel,
        )
    reply_id, found, written = repository.store_reply(
        session,
        workspace_id=draft.workspace_id,
        conversation_id=draft.conversation_id,
        channel=draft.channel,
        body=body,
        body_redacted=redacted,
        answers=draft.batch,
        prompt_message_ids=prompt.message_ids,
        verdict=verdict,
    )
    if written != found:
        raise LeaseLost  # another run settled some of them: roll back and look again
    jobs.enqueue(session, "webhooks.send", message_id=reply_id)
    if prompt.fold_through is not None:
        memory.request_fold(session, draft.conversation_id, prompt.fold_through)
    return reply_id


def _model_down(draft: Draft, run: Run, exc: Exception) -> None:
    """Messages wait for the model; after a while the user gets one holding notice."""
    waited = (utcnow() - draft.oldest_created).total_seconds()
    if waited >= draft.policy.holding_after_seconds:
        with session_scope() as session:
            _check_lease(session, draft.conversation_id, run.holder)
            conversation = session.get(Conversation, draft.conversation_id)
            assert conversation is not None
            _notice(
                session,
                conversation,
                "holding",
                f"outage:{draft.batch[0]}",
                draft.policy.notice("holding", draft.language),
                channel=draft.channel,
            )
    delay = min(30.0, max(1.0, waited / 4))
    log.warning(
        "pipeline.model_unavailable",
        conversation_id=draft.conversation_id,
        error=type(exc).__name__,
        waited=round(waited, 1),
        retry_in=delay,
    )
    raise jobs.Defer(delay, "model unavailable")
