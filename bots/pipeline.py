"""The reply pipeline, run by the ``conversations`` lane for each inbound message:

screen in (PII → placeholders) → memory → model → screen out → store the reply → enqueue send.

No transaction is open while the model runs. The reply is stored in the same transaction that
marks the job done, and ``messages.reply_to_id`` is unique, so a redelivered task can call the
model twice but can never store, or send, two replies.
"""

from __future__ import annotations

import uuid
from functools import lru_cache
from typing import Any

import structlog
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bots import memory, repository
from core import jobs
from core.config import get_settings
from core.db import session_scope
from core.models import Message
from inference import (
    BadRequest,
    ContextTooLong,
    GenerationParams,
    InferenceClient,
    parse_endpoints,
)
from moderation import canary_instruction, make_canary, screen_inbound, screen_outbound

log = structlog.get_logger()


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


def _request_id(message_id: int, variant: str = "") -> str:
    """A stable UUID per message (and variant), so a retried request is recognisable in logs."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"parley:message:{message_id}:{variant}").hex


def _mark_dead(session: Session, *, job_id: int, message_id: int, **_: Any) -> None:
    session.execute(
        update(Message)
        .where(Message.id == message_id, Message.status == "received")
        .values(status="dead", last_error="reply attempts exhausted")
    )


def _screen_turns(turns: list[Message]) -> None:
    for turn in turns:
        if turn.body_redacted is None and turn.body is not None:
            verdict = screen_inbound(turn.body)
            turn.body_redacted = verdict.redacted
            turn.verdict = {"reasons": list(verdict.reasons), "action": verdict.action}


@jobs.job("bots.reply", on_dead=_mark_dead)
def reply(*, job_id: int, message_id: int) -> None:
    with session_scope() as session:
        context = repository.reply_context(session, message_id)
        if context is None or context.message.status != "received":
            if not jobs.complete(session, job_id):
                raise jobs.AlreadyDone
            return
        bot, conversation = context.bot, context.conversation
        turns = repository.recent_turns(
            session, conversation.id, message_id, max(1, bot.history_turns)
        )
        _screen_turns(turns)
        canary = make_canary(bot.canary_seed)
        prompt = memory.build_prompt(bot, turns, canary_line=canary_instruction(canary))
        user_text = context.message.body or ""
        params = GenerationParams(
            temperature=bot.temperature,
            max_tokens=bot.max_tokens,
            top_p=bot.top_p,
            stop=tuple(bot.stop),
            seed=bot.seed,
        )
        bot_model, system_prompt, fallback = bot.model, bot.system_prompt, bot.fallback_reply
        workspace_id, conversation_id = conversation.workspace_id, conversation.id
    log.info(
        "pipeline.prompt",
        message_id=message_id,
        conversation_id=conversation_id,
        turns=len(prompt.message_ids),
    )

    reasons: list[str] = []
    try:
        result = inference_client().chat(
            prompt.messages, params=params, model=bot_model, request_id=_request_id(message_id)
        )
        draft = result.text
    except ContextTooLong:
        # Keep the system prompt and the newest turn only; a summary arrives with memory folding.
        short = [prompt.messages[0], prompt.messages[-1]]
        result = inference_client().chat(
            short, params=params, model=bot_model, request_id=_request_id(message_id, "short")
        )
        draft = result.text
        prompt = memory.Prompt(short, prompt.message_ids[-1:])
    except BadRequest as exc:
        draft = ""
        reasons.append("model.bad_request")
        log.warning("pipeline.model_rejected", message_id=message_id, error=str(exc)[:200])

    verdict = screen_outbound(
        draft, canary=canary, user_text=user_text, system_prompt=system_prompt
    )
    reasons.extend(verdict.reasons)
    text = verdict.text if verdict.allowed else fallback
    action = "send" if verdict.allowed else "fallback"
    redacted = screen_inbound(text).redacted

    try:
        with session_scope() as session:
            if not jobs.complete(session, job_id):
                raise jobs.AlreadyDone
            out = Message(
                workspace_id=workspace_id,
                conversation_id=conversation_id,
                direction="out",
                channel=context.message.channel,
                kind="text",
                body=text,
                body_redacted=redacted,
                status="pending",
                reply_to_id=message_id,
                prompt_message_ids=prompt.message_ids,
                verdict={"reasons": reasons, "action": action},
                attempts=0,
            )
            session.add(out)
            session.execute(
                update(Message)
                .where(Message.id == message_id, Message.status == "received")
                .values(status="replied")
            )
            session.flush()
            jobs.enqueue(session, "webhooks.send", message_id=out.id)
    except IntegrityError as exc:
        raise jobs.AlreadyDone from exc
    log.info(
        "pipeline.replied",
        message_id=message_id,
        conversation_id=conversation_id,
        reply_id=out.id,
        action=action,
        reasons=reasons,
    )
