"""Conversation memory: the prompt for one reply, built from what Postgres stores.

A prompt is OpenAI-style ``messages`` (the server applies the model's own chat template):

1. one system message: the bot's system prompt, its business scope (WhatsApp allows no
   general-purpose assistants, so the model is told to decline anything else), the canary
   line, and the conversation's rolling summary when it has one;
2. the recent turns, oldest first: answered user messages (a burst reads as one turn) and the
   replies, bot or human, that were not folded into the summary yet;
3. the turn being answered.

Only the redacted copy of a message ever enters a prompt; a message the contact deleted or
unsent, one edited and not screened again, and a reply that failed to send never do
(``repository.history`` and friends), and a summary written from such a message is discarded
and written again (``repository.sources_intact``).

The budget
----------
``budget = context - max_tokens - margin``: ``context`` is the served model's window (the bot's
``memory.context_tokens``, else ``PARLEY_MEMORY_CONTEXT_TOKENS``; the smaller of that and what
the server reports, vLLM's ``max_model_len``; with neither, ``PARLEY_LOCAL_MODEL_CTX``),
``max_tokens`` the bot's reply cap, ``margin`` ``memory.margin_tokens`` /
``PARLEY_MEMORY_MARGIN_TOKENS``. Sizes are counted with the served model's tokenizer through
:class:`inference.Tokenizer` (each message content once, cached; the template's framing measured
once from the server), never guessed from characters.

Folding in steps
----------------
While the whole prompt fits the budget, and the turns stay within ``history_turns`` stored
messages, every turn of the conversation is in it: each prompt is the previous one plus the
previous reply and the new message, so the server's prefix cache serves everything but the
end. When a turn finds the prompt over either limit, the oldest turns are folded into the
summary in one step, enough of them that the prompt right after the fold uses at most
:data:`FOLD_TO` (60 %) of the budget and of ``history_turns``, counting the summary at its
longest (``summary_tokens``). The fold is requested in the transaction that stores the reply
(``conversation_memories.fold_through_id``, one pending fold at a time) and done by the
``maintenance.fold_memory`` job (``bots.memory_tasks``) with the model, off the conversation
lane.

While a fold is pending the reply is never held up and never over budget: the prompt keeps the
system message and the current summary and drops the oldest turns until it fits. When the fold
lands, the prompt starts from the new summary, and grows only at its end again.

Without a tokenizer (a server with neither vLLM's ``/tokenize`` nor llama.cpp's
``/extras/tokenize``, or one that cannot be reached) nothing is counted: the prompt is bounded
by ``history_turns`` alone (folding the same way), and a server that answers "context too long"
gets the system message and the newest turn (:func:`shrink`).
"""

from __future__ import annotations

import atexit
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import structlog
from sqlalchemy.orm import Session

from bots import repository
from core import jobs
from core.config import get_settings
from core.models import Bot, Message
from inference import InferenceError, Tokenizer, parse_endpoints

log = structlog.get_logger()

FOLD_TASK = "maintenance.fold_memory"
# After a fold the prompt uses at most this share of the budget (and of history_turns).
FOLD_TO = 0.6
SUMMARY_HEADING = "Summary of the conversation so far:"
DEFAULT_SCOPE_LINE = (
    "Only help with this business's own topics; politely decline general-purpose requests "
    "that have nothing to do with it."
)
DEFAULT_SUMMARY_PROMPT = (
    "You keep notes on a customer conversation for a business. Rewrite the summary so it also "
    "covers the new messages: what the customer wants, facts they gave, what was promised or "
    "answered, anything still open. Be brief and factual; write only the summary."
)


@dataclass(frozen=True)
class Config:
    """A bot's memory settings, its ``memory:`` block over the ``PARLEY_MEMORY_*`` settings."""

    context_tokens: int | None
    fallback_context: int
    margin_tokens: int
    summary_tokens: int
    summary_prompt: str


def config_of(bot: Bot) -> Config:
    settings = get_settings()
    spec: Mapping[str, Any] = (bot.extra or {}).get("memory") or {}
    return Config(
        context_tokens=spec.get("context_tokens") or settings.memory_context_tokens,
        fallback_context=settings.local_model_ctx,
        margin_tokens=int(spec.get("margin_tokens", settings.memory_margin_tokens)),
        summary_tokens=int(spec.get("summary_tokens") or settings.memory_summary_tokens),
        summary_prompt=str(spec.get("summary_prompt") or DEFAULT_SUMMARY_PROMPT),
    )


def system_text(bot: Bot, *, canary_line: str) -> str:
    """The bot's instructions: its system prompt, its scope, the canary line."""
    scope = (bot.extra or {}).get("scope")
    scope_line = (
        f"Only help with {scope.strip().rstrip('.')}. Politely decline anything else."
        if isinstance(scope, str) and scope.strip()
        else DEFAULT_SCOPE_LINE
    )
    return f"{bot.system_prompt.rstrip()}\n\n{scope_line}\n\n{canary_line}"


def with_summary(system: str, summary: str | None) -> str:
    return f"{system}\n\n{SUMMARY_HEADING}\n{summary}" if summary else system


# --- turns --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One prompt message made of one or more stored messages (a burst of user messages reads
    as one turn)."""

    role: str
    content: str
    message_ids: tuple[int, ...]


def turns_of(messages: Sequence[Message]) -> list[Turn]:
    """The prompt turns of stored messages in order; a message without a redacted copy is
    skipped (it never enters a prompt)."""
    turns: list[Turn] = []
    for message in messages:
        if message.body_redacted is None or message.kind == "deleted":
            continue
        role = "user" if message.direction == "in" else "assistant"
        if turns and role == "user" and turns[-1].role == "user":
            last = turns[-1]
            turns[-1] = Turn(
                role,
                last.content + "\n" + message.body_redacted,
                (*last.message_ids, message.id),
            )
        else:
            turns.append(Turn(role, message.body_redacted, (message.id,)))
    return turns


# --- the arithmetic -----------------------------------------------------------------------------


class TooLong(Exception):
    """The turn being answered does not fit the budget even with no history at all."""


@dataclass(frozen=True)
class Plan:
    """``start``: the first history turn in this turn's prompt; ``fold``: fold history turns
    ``[0, fold)`` into the summary (0: no fold); ``tokens``: the prompt's size."""

    start: int
    fold: int
    tokens: int


def plan(
    *,
    fixed: int,
    history: Sequence[int],
    sizes: Sequence[int],
    newest: int,
    budget: int | None,
    max_messages: int,
    summary_room: int,
    fold_pending: bool,
    must_fold: bool = False,
) -> Plan:
    """Where this turn's prompt starts and how much to fold.

    ``fixed``: the system message with the current summary and the template's fixed framing;
    ``history``: each history turn's tokens (framing included), oldest first, and ``sizes`` its
    count of stored messages; ``newest``: the turn being answered; ``budget``: ``None`` when
    nothing can be counted (then only ``max_messages`` bounds the prompt); ``summary_room``:
    what ``fixed`` is at most once a fold lands; ``must_fold``: unfolded turns older than
    ``history`` exist. Raises :class:`TooLong` when ``fixed + newest`` exceeds the budget.
    """
    n = len(history)
    if budget is not None and fixed + newest > budget:
        raise TooLong
    # suffix[i]: tokens and messages of history[i:].
    tokens_from = [0] * (n + 1)
    messages_from = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        tokens_from[i] = tokens_from[i + 1] + history[i]
        messages_from[i] = messages_from[i + 1] + sizes[i]

    def fits(i: int, limit: float, room: float, message_limit: float) -> bool:
        return (limit == math.inf or room + tokens_from[i] + newest <= limit) and messages_from[
            i
        ] <= message_limit

    limit = math.inf if budget is None else float(budget)
    start = 0
    while start < n and not fits(start, limit, fixed, max_messages):
        start += 1
    fold = 0
    if n and (start > 0 or must_fold) and not fold_pending and max_messages > 0:
        target = math.inf if budget is None else math.floor(FOLD_TO * budget)
        message_target = math.floor(FOLD_TO * max_messages)
        fold = next(
            (f for f in range(1, n + 1) if fits(f, target, summary_room, message_target)), n
        )
    return Plan(start=start, fold=fold, tokens=fixed + tokens_from[start] + newest)


# --- the prompt ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """The messages sent and the stored messages they were made of. ``tokens`` and ``budget``
    are ``None`` when nothing could be counted; ``fold_through``: ask for a fold of every turn
    up to this message id (with the reply); ``too_long``: the turn does not fit at all."""

    messages: list[dict[str, str]]
    message_ids: list[int]
    tokens: int | None = None
    budget: int | None = None
    fold_through: int | None = None
    too_long: bool = False
    served_tokens: int | None = None


def served(prompt: Prompt, prompt_tokens: int | None) -> Prompt:
    """The prompt with the size the server reported for it."""
    return replace(prompt, served_tokens=prompt_tokens)


def usage(prompt: Prompt) -> dict[str, int]:
    """What a reply's verdict records of its prompt: the server's count (``prompt_tokens``),
    memory's own (``counted``) and the ``budget``, those that are known."""
    found = {
        "prompt_tokens": prompt.served_tokens,
        "counted": prompt.tokens,
        "budget": prompt.budget,
    }
    return {key: value for key, value in found.items() if value is not None}


@dataclass(frozen=True)
class Context:
    """What a turn's prompt is made of, read in the turn's transaction."""

    conversation_id: int
    system: str
    summary: str | None
    history: tuple[Turn, ...]
    newest: tuple[Turn, ...]
    older_unread: bool
    fold_pending: bool
    max_messages: int
    max_tokens: int
    model: str | None
    config: Config


def load(
    session: Session,
    bot: Bot,
    conversation_id: int,
    pending: Sequence[Message],
    *,
    canary_line: str,
) -> Context:
    """Read the conversation's memory: its summary (dropped when a message it was written from
    left memory since) and the turns no summary covers, up to twice ``history_turns``."""
    row = repository.conversation_memory(session, conversation_id)
    summary, through = None, 0
    if row is not None and row.through_id and repository.sources_intact(session, row.source_ids):
        summary, through = row.summary, row.through_id
    limit = bot.history_turns
    rows, older = repository.unfolded_history(
        session, conversation_id, after_id=through, limit=2 * limit + 8 if limit else 0
    )
    pending_ids = {m.id for m in pending}
    turns = turns_of([*rows, *pending])
    split = len(turns)
    while split > 0 and pending_ids.intersection(turns[split - 1].message_ids):
        split -= 1
    return Context(
        conversation_id=conversation_id,
        system=system_text(bot, canary_line=canary_line),
        summary=summary or None,
        history=tuple(turns[:split]),
        newest=tuple(turns[split:]),
        older_unread=older,
        fold_pending=row is not None and row.fold_through_id is not None,
        max_messages=limit,
        max_tokens=bot.max_tokens,
        model=bot.model,
        config=config_of(bot),
    )


def _compose(ctx: Context, start: int, fold: int, **extra: Any) -> Prompt:
    kept = [*ctx.history[start:], *ctx.newest]
    messages = [{"role": "system", "content": with_summary(ctx.system, ctx.summary)}]
    messages += [{"role": t.role, "content": t.content} for t in kept]
    through = ctx.history[fold - 1].message_ids[-1] if fold else None
    ids = [i for t in kept for i in t.message_ids]
    return Prompt(messages, ids, fold_through=through, **extra)


def budget_of(ctx: Context, tokenizer: Tokenizer) -> int:
    """``context - max_tokens - margin`` (see the module docstring)."""
    reported = tokenizer.context_length(model=ctx.model)
    configured = ctx.config.context_tokens
    if configured and reported:
        context = min(configured, reported)
    else:
        context = configured or reported or ctx.config.fallback_context
    return context - ctx.max_tokens - ctx.config.margin_tokens


def fit(ctx: Context, tokenizer: Tokenizer | None) -> Prompt:
    """This turn's prompt within the budget, and the fold to ask for, if any. Talks to the
    tokenizer (no transaction should be open); never raises for a tokenizer that is missing or
    down (it counts nothing then)."""
    try:
        if tokenizer is not None and tokenizer.available():
            return _fit_counted(ctx, tokenizer)
    except InferenceError as exc:
        log.warning(
            "memory.uncounted", conversation_id=ctx.conversation_id, error=type(exc).__name__
        )
    layout = plan(
        fixed=0,
        history=[0] * len(ctx.history),
        sizes=[len(t.message_ids) for t in ctx.history],
        newest=0,
        budget=None,
        max_messages=ctx.max_messages,
        summary_room=0,
        fold_pending=ctx.fold_pending,
        must_fold=ctx.older_unread,
    )
    return _compose(ctx, layout.start, layout.fold)


def _fit_counted(ctx: Context, tokenizer: Tokenizer) -> Prompt:
    framing = tokenizer.framing(model=ctx.model)
    system = with_summary(ctx.system, ctx.summary)
    bare = with_summary(ctx.system, " ")  # the summary's heading without a summary
    texts = [system, bare, *(t.content for t in ctx.history), *(t.content for t in ctx.newest)]
    counts = tokenizer.count_many(texts, model=ctx.model)
    fixed = framing.base + counts[0]
    summary_room = framing.base + counts[1] + ctx.config.summary_tokens
    n = len(ctx.history)
    history = [framing.of(t.role) + c for t, c in zip(ctx.history, counts[2 : 2 + n], strict=True)]
    newest = sum(framing.of(t.role) + c for t, c in zip(ctx.newest, counts[2 + n :], strict=True))
    budget = budget_of(ctx, tokenizer)
    try:
        layout = plan(
            fixed=fixed,
            history=history,
            sizes=[len(t.message_ids) for t in ctx.history],
            newest=newest,
            budget=budget,
            max_messages=ctx.max_messages,
            summary_room=summary_room,
            fold_pending=ctx.fold_pending,
            must_fold=ctx.older_unread,
        )
    except TooLong:
        log.warning("memory.too_long", conversation_id=ctx.conversation_id, budget=budget)
        # Folding the history would not help: the turn alone is over budget.
        return replace(_compose(ctx, n, 0), budget=budget, too_long=True)
    if layout.start or layout.fold:
        log.info(
            "memory.trimmed",
            conversation_id=ctx.conversation_id,
            dropped=layout.start,
            fold=layout.fold,
            tokens=layout.tokens,
            budget=budget,
        )
    return _compose(ctx, layout.start, layout.fold, tokens=layout.tokens, budget=budget)


def shrink(prompt: Prompt, ctx: Context) -> Prompt:
    """After the server said "context too long" anyway: the system message (with the summary)
    and the turn being answered, and a fold of every history turn when none is pending."""
    fold = len(ctx.history) if not ctx.fold_pending else 0
    return replace(_compose(ctx, len(ctx.history), fold), budget=prompt.budget)


def request_fold(session: Session, conversation_id: int, through_id: int) -> bool:
    """In the transaction that stores the reply: mark the fold pending and enqueue its job
    (nothing when one is pending already). True when it was requested."""
    if not repository.request_fold(session, conversation_id, through_id):
        return False
    jobs.enqueue(session, FOLD_TASK, conversation_id=conversation_id, through_id=through_id)
    log.info("memory.fold_requested", conversation_id=conversation_id, through_id=through_id)
    return True


# --- the tokenizer of the served model -----------------------------------------------------------


def tokenizer() -> Tokenizer | None:
    """One tokenizer (and its cache) per process and endpoint configuration; ``None`` without
    endpoints."""
    settings = get_settings()
    return _tokenizer_for(
        settings.inference_endpoints or "",
        settings.inference_connect_timeout,
        settings.memory_tokenize_cache,
    )


@lru_cache(maxsize=4)
def _tokenizer_for(spec: str, connect_timeout: float, cache_size: int) -> Tokenizer | None:
    if not spec:
        return None
    counter = Tokenizer(
        parse_endpoints(spec),
        timeout=10.0,
        connect_timeout=connect_timeout,
        cache_size=cache_size,
    )
    # It lives as long as its process: its connections close before the interpreter goes.
    atexit.register(counter.close)
    return counter
