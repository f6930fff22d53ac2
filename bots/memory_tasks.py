"""The fold job: write a conversation's rolling summary with the model (maintenance lane).

``maintenance.fold_memory`` with ``conversation_id`` and ``through_id`` is enqueued by
:func:`bots.memory.request_fold` in the transaction that stores a reply, when the prompt
outgrew its budget (see ``bots.memory``). It

1. reads, in the transaction that counts the attempt, the stored summary (dropped when a
   message it was written from left memory since: the fold then starts over from the first
   turn) and every prompt turn after it up to ``through_id``;
2. asks the model, with no transaction open, for the summary: the previous summary and the
   turns, in as many steps as it takes for each request to fit the model's context (each step
   summarises the previous step's summary and the next turns), at temperature 0 with the
   bot's seed, at most ``summary_tokens`` long; the summary is screened for PII like an
   inbound message;
3. stores it with a conditional UPDATE (only when the stored summary still ends where step 1
   found it) that clears the pending fold, and completes the job in the same transaction.

A re-run after step 3 finds the summary through ``through_id`` and changes nothing. When the
model is down the job backs off like any other; meanwhile prompts drop their oldest turns.
After the last attempt the pending mark is cleared, so a later turn asks again.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy.orm import Session

from bots import memory, repository
from bots.pipeline import inference_client
from core import jobs
from core.db import session_scope
from core.models import Bot, Conversation
from inference import GenerationParams, InferenceClient, InferenceError, Tokenizer
from moderation import screen_inbound

log = structlog.get_logger()

TASK = memory.FOLD_TASK
# Without a tokenizer, how many turns one summarising request takes.
UNCOUNTED_STEP = 16


@dataclass(frozen=True)
class FoldWork:
    conversation_id: int
    workspace_id: int
    base_through: int
    summary: str | None
    source_ids: tuple[int, ...]
    turns: tuple[memory.Turn, ...]
    through_id: int
    model: str | None
    seed: int | None
    config: memory.Config


def prepare(
    session: Session, *, job_id: int, conversation_id: int, through_id: int
) -> FoldWork | None:
    """Step 1; None (job completed) when a summary through ``through_id`` is already stored."""
    row = repository.conversation_memory(session, conversation_id)
    conversation = session.get(Conversation, conversation_id)
    if row is None or conversation is None:
        jobs.complete(session, job_id)
        return None
    intact = repository.sources_intact(session, row.source_ids)
    if intact and row.through_id >= through_id:
        repository.clear_fold(session, conversation_id, through_id)
        jobs.complete(session, job_id)
        return None
    bot = session.get(Bot, conversation.bot_id)
    assert bot is not None
    after = row.through_id if intact else 0
    messages = repository.history_range(
        session, conversation_id, after_id=after, through_id=through_id
    )
    return FoldWork(
        conversation_id=conversation_id,
        workspace_id=conversation.workspace_id,
        base_through=row.through_id,
        summary=row.summary if intact else None,
        source_ids=tuple(row.source_ids) if intact else (),
        turns=tuple(memory.turns_of(messages)),
        through_id=through_id,
        model=bot.model,
        seed=bot.seed,
        config=memory.config_of(bot),
    )


def fold(work: FoldWork, *, job_id: int, conversation_id: int, through_id: int) -> None:
    """Steps 2 and 3."""
    summary = summarise(
        inference_client(), memory.tokenizer(), work, request_key=f"{job_id}:{through_id}"
    )
    ids = [i for t in work.turns for i in t.message_ids]
    with session_scope() as session:
        stored = repository.store_fold(
            session,
            conversation_id,
            base_through=work.base_through,
            through_id=through_id,
            summary=summary,
            source_ids=[*work.source_ids, *ids],
        )
        if not jobs.complete(session, job_id):
            raise jobs.AlreadyDone
    log.info(
        "memory.folded",
        conversation_id=conversation_id,
        through_id=through_id,
        turns=len(work.turns),
        stored=stored,
    )


def give_up(session: Session, *, job_id: int, conversation_id: int, through_id: int) -> None:
    repository.clear_fold(session, conversation_id)


fold_memory = jobs.job(TASK, on_dead=give_up, prepare=prepare)(fold)


def _line(turn: memory.Turn) -> str:
    return f"{'Customer' if turn.role == 'user' else 'Business'}: {turn.content}"


def _request(
    config: memory.Config, summary: str | None, lines: Sequence[str]
) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": config.summary_prompt},
        {
            "role": "user",
            "content": f"Summary so far:\n{summary or '(none)'}\n\nNew messages:\n"
            + "\n".join(lines),
        },
    ]


def _steps(work: FoldWork, tokenizer: Tokenizer | None) -> list[list[str]]:
    """The turns as transcript lines, split so that each summarising request fits."""
    lines = [_line(t) for t in work.turns]
    if tokenizer is None:
        return [lines[i : i + UNCOUNTED_STEP] for i in range(0, len(lines), UNCOUNTED_STEP)]
    try:
        if not tokenizer.available():
            return [lines[i : i + UNCOUNTED_STEP] for i in range(0, len(lines), UNCOUNTED_STEP)]
        framing = tokenizer.framing(model=work.model)
        frame = _request(work.config, "", [])
        fixed = (
            framing.base
            + framing.user
            + sum(tokenizer.count_many([m["content"] for m in frame], model=work.model))
            + work.config.summary_tokens  # the previous summary, at its longest
        )
        sizes = tokenizer.count_many(lines, model=work.model)
        context = work.config.context_tokens or tokenizer.context_length(model=work.model)
        room = (context or work.config.fallback_context) - work.config.summary_tokens
        room -= work.config.margin_tokens + fixed
    except InferenceError:
        return [lines[i : i + UNCOUNTED_STEP] for i in range(0, len(lines), UNCOUNTED_STEP)]
    steps: list[list[str]] = [[]]
    used = 0
    for line, size in zip(lines, sizes, strict=True):
        if size + 1 > room:
            # One turn longer than a whole request: it is left out of the summary.
            log.warning("memory.fold_turn_too_long", conversation_id=work.conversation_id)
            continue
        if steps[-1] and used + size + 1 > room:
            steps.append([])
            used = 0
        steps[-1].append(line)
        used += size + 1  # the newline between lines
    return [s for s in steps if s]


def summarise(
    client: InferenceClient, tokenizer: Tokenizer | None, work: FoldWork, *, request_key: str
) -> str:
    """The summary of ``work.summary`` and ``work.turns`` (step 2 of the module docstring)."""
    summary = work.summary
    params = GenerationParams(
        temperature=0.0, max_tokens=work.config.summary_tokens, seed=work.seed
    )
    for index, lines in enumerate(_steps(work, tokenizer)):
        result = client.chat(
            _request(work.config, summary, lines),
            params=params,
            model=work.model,
            request_id=uuid.uuid5(uuid.NAMESPACE_URL, f"parley:fold:{request_key}:{index}").hex,
            conversation_key=work.conversation_id,
            cache_salt=str(work.workspace_id),
        )
        summary = screen_inbound(result.text).redacted.strip() or summary
    return summary or ""
