"""``parley test conversations.yaml``: scripted conversations with assertions per turn.

A file lists conversations; each is a list of turns (a user message, a reaction to the bot's
last reply, or the deletion of the user's last message) with optional expectations on what the
platform did with the turn: the outcome kind (``core.models.outcome.OUTCOME_KINDS``; ``reply`` is
accepted for ``replied``), the notices queued (``bots.policy.DEFAULT_NOTICES`` kinds and
``template``), the moderation reason codes (the inbound verdict's and the reply's), the
conversation's mode and the contact's opt-out after the turn, and a regular expression the reply
must match (``re.search``).

How a run works (:func:`run`):

- Everything happens in the caller's transaction: the CLI (:func:`main`) opens one on a single
  connection and rolls it back at the end, so the bots applied from ``--bots`` (or the demo bot),
  the contacts, conversations, replies and jobs leave no trace in the database.
- Each bot a conversation names is set, inside that transaction, to temperature 0 with the run's
  seed, a canary derived from the seed (the canary line is part of the system prompt, so the
  prompt is the same on every run) and a burst window of 0 (a turn is answered before the next
  one is sent, so there is no burst to wait for).
- A turn is one webhook, built and signed as Meta sends it (``webhooks.simulator``), applied by
  the in-process intake (``webhooks.service.intake``); then the conversation's jobs (the
  ``bots.reply`` jobs of its messages, memory folds: every lane but the send lane) run in this
  process through their registered tasks until none is pending. Replies are stored, not sent:
  the send lane does not run, so a reaction names a made-up id for the bot's reply.
- Jobs buffered by a transaction are taken before it commits (``core.jobs.take_buffer``): this
  process runs them itself, so nothing reaches a broker (a deferred job still rings one, which
  for the CLI is an in-memory broker).

Exit codes of the CLI: 0 every expectation held, 1 one did not (or a turn got no outcome), 2 a
file is invalid (the message names the file, line and field), 3 the run could not start
(database or model unavailable).
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import create_engine, event, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

import bots.tasks  # noqa: F401  # registers the bots lane's tasks, which run in this process
from bots import repository as bot_repository
from bots.config import line_of, load_bots
from bots.schemas import BotsFile
from bots.service import apply_bots
from core import jobs
from core.celery_app import celery_app
from core.config import Settings, get_settings, reset_settings
from core.db import get_engine, make_sessionmaker, session_scope, use_sessionmaker
from core.errors import ConfigError
from core.models import (
    Bot,
    ChannelAccount,
    Contact,
    Message,
    MetaApp,
    Notice,
    OutboxJob,
    Workspace,
)
from core.models import Conversation as ConversationRow
from core.models import Outcome as OutcomeRow
from inference import local
from parley import embedded, migrate
from parley.chat import new_user_id
from parley.demo import demo_bots
from parley.runtime import adopt_running_platform
from webhooks import service, simulator
from webhooks.directory import Directory

OUTCOME_ALIASES = {"reply": "replied"}

# The vocabularies of core.models.outcome.OUTCOME_KINDS and bots.policy.DEFAULT_NOTICES (plus the
# window template); a unit test keeps them in step.
Outcome = Literal[
    "reply",
    "replied",
    "held",
    "blocked",
    "opted_out",
    "human_mode",
    "notice",
    "deleted",
    "window_expired",
    "limited",
    "dead",
]
NoticeKind = Literal[
    "disclosure",
    "holding",
    "opt_out",
    "opt_in",
    "human",
    "media",
    "unsupported",
    "limit",
    "template",
]
Mode = Literal["bot", "human", "paused"]
Channel = Literal["whatsapp", "messenger", "instagram"]

# A scripted turn waits this long beyond the model timeout for its reply job to finish.
TURN_GRACE_SECONDS = 30.0


# --- the file -------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expect(_Strict):
    """What must hold after a turn; a key left out is not checked."""

    outcome: Outcome | None = None
    reply: str | None = Field(None, min_length=1)
    notices: list[NoticeKind] | None = None
    reasons: list[str] | None = None
    mode: Mode | None = None
    opted_out: bool | None = None

    @field_validator("reply")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    @property
    def outcome_kind(self) -> str | None:
        return OUTCOME_ALIASES.get(self.outcome, self.outcome) if self.outcome else None

    def checks_result(self) -> bool:
        return any(v is not None for v in (self.outcome, self.reply, self.reasons))


class Turn(_Strict):
    """One thing the user does: exactly one of ``user``, ``react``, ``delete``."""

    user: str | None = Field(None, min_length=1, max_length=4096)
    react: str | None = Field(None, max_length=16)
    delete: Literal[True] | None = None
    expect: Expect = Expect()

    @model_validator(mode="after")
    def _one_action(self) -> Turn:
        given = [k for k in ("user", "react", "delete") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a turn needs exactly one of 'user', 'react', 'delete'")
        if self.user is None and self.expect.checks_result():
            raise ValueError(
                f"a {given[0]} turn stores no message: only 'notices', 'mode' and 'opted_out'"
                " can be expected of it"
            )
        return self

    @property
    def action(self) -> str:
        return "user" if self.user is not None else "react" if self.react is not None else "delete"


class Conversation(_Strict):
    name: str = Field(min_length=1, max_length=200)
    bot: str | None = Field(None, min_length=1)
    channel: Channel | None = None
    turns: list[Turn] = Field(min_length=1)


class ScenarioFile(_Strict):
    bot: str | None = Field(None, min_length=1)
    conversations: list[Conversation] = Field(min_length=1)

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """What pydantic cannot check field by field: (location, message) pairs."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        names: set[str] = set()
        for i, conversation in enumerate(self.conversations):
            if conversation.name in names:
                found.append((("conversations", i, "name"), f"{conversation.name!r} is used twice"))
            names.add(conversation.name)
            spoke = False
            for j, turn in enumerate(conversation.turns):
                loc: tuple[str | int, ...] = ("conversations", i, "turns", j, turn.action)
                if turn.action != "user" and not spoke:
                    found.append((loc, f"a {turn.action} turn needs an earlier 'user' turn"))
                if turn.delete and conversation.channel == "messenger":
                    found.append((loc, "Messenger has no unsend"))
                spoke = spoke or turn.action == "user"
        return found


@dataclass(frozen=True)
class Scenarios:
    """A validated file and where each of its parts is written (for messages)."""

    spec: ScenarioFile
    source: str
    root: yaml.Node | None = field(repr=False, default=None)

    def line(self, *loc: str | int) -> int:
        return line_of(self.root, loc) or 1

    def where(self, *loc: str | int) -> str:
        return f"{self.source}:{self.line(*loc)}"

    def error(self, problems: list[tuple[tuple[str | int, ...], str]]) -> ConfigError:
        return _error(self.source, self.root, problems)


def _error(
    source: str, root: yaml.Node | None, problems: list[tuple[tuple[str | int, ...], str]]
) -> ConfigError:
    """One line per problem: ``file:line: field.path: message``."""
    return ConfigError(
        "\n".join(
            f"{source}:{line_of(root, loc) or 1}:"
            f" {'.'.join(str(p) for p in loc) or '(top level)'}: {message}"
            for loc, message in problems
        )
    )


def parse_scenarios(text: str, *, source: str = "conversations.yaml") -> Scenarios:
    """Validate a conversations file. Raises :class:`ConfigError` naming the line and field."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: expected a mapping with 'conversations'")
    try:
        spec = ScenarioFile.model_validate(data)
    except ValidationError as exc:
        problems = [
            (tuple(e["loc"]), str(e["msg"]).removeprefix("Value error, ")) for e in exc.errors()
        ]
        raise _error(source, root, problems) from exc
    problems = spec.problems()
    if problems:
        raise _error(source, root, problems)
    return Scenarios(spec, source, root)


def load_scenarios(path: Path) -> Scenarios:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_scenarios(text, source=str(path))


# --- checking a turn ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnResult:
    """What the platform did with one turn."""

    outcome: str | None = None
    detail: str | None = None
    reply: str | None = None
    notices: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    mode: str | None = None
    opted_out: bool | None = None
    error: str | None = None


def _short(text: str | None, limit: int = 60) -> str:
    if text is None:
        return "no reply"
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def _listed(items: Sequence[str]) -> str:
    return "[" + ", ".join(items) + "]"


def check(expect: Expect, got: TurnResult) -> list[str]:
    """Each expectation that does not hold, as ``field: expected …, got …``."""
    if got.error is not None:
        return [got.error]
    failures: list[str] = []
    kind = expect.outcome_kind
    if kind is not None and kind != got.outcome:
        actual = got.outcome or "no outcome"
        detail = f" ({got.detail})" if got.detail else ""
        failures.append(f"outcome: expected {kind}, got {actual}{detail}")
    if expect.reply is not None and (got.reply is None or not re.search(expect.reply, got.reply)):
        failures.append(f"reply: expected a match for /{expect.reply}/, got {_short(got.reply)}")
    if expect.notices is not None and list(expect.notices) != list(got.notices):
        failures.append(f"notices: expected {_listed(expect.notices)}, got {_listed(got.notices)}")
    if expect.reasons is not None and sorted(set(expect.reasons)) != sorted(set(got.reasons)):
        failures.append(f"reasons: expected {_listed(expect.reasons)}, got {_listed(got.reasons)}")
    if expect.mode is not None and expect.mode != got.mode:
        failures.append(f"mode: expected {expect.mode}, got {got.mode}")
    if expect.opted_out is not None and expect.opted_out != got.opted_out:
        failures.append(
            f"opted_out: expected {str(expect.opted_out).lower()}, got {str(got.opted_out).lower()}"
        )
    return failures


def describe(turn: Turn, got: TurnResult) -> str:
    """The short account of a passing turn."""
    if turn.action != "user":
        return f"{turn.action}: mode {got.mode}, opted out {str(got.opted_out).lower()}"
    text = got.outcome or "no outcome"
    if got.reply is not None:
        text += f" {_short(got.reply)}"
    if got.notices:
        text += f" notices {_listed(got.notices)}"
    if got.reasons:
        text += f" reasons {_listed(got.reasons)}"
    return text


@dataclass(frozen=True)
class Checked:
    """One turn of a run: where it is written, what happened, what did not hold."""

    conversation: str
    turn: int  # 1-based
    line: int
    result: TurnResult
    failures: tuple[str, ...]


@dataclass
class Report:
    conversations: int = 0
    conversations_failed: int = 0
    turns: int = 0
    turns_failed: int = 0
    checked: list[Checked] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.turns_failed else 0

    def summary(self) -> str:
        verdict = "FAILED" if self.turns_failed else "passed"
        return (
            f"{verdict}: {self.conversations} conversations"
            f" ({self.conversations_failed} failed), {self.turns} turns"
            f" ({self.turns - self.turns_failed} passed, {self.turns_failed} failed)"
        )


# --- running --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The channel account a conversation talks to, and the secret that signs its webhooks."""

    bot: str
    channel: str
    account: str
    secret: str


@dataclass
class _Thread:
    """One scripted conversation's state between turns."""

    target: Target
    user: str
    conversation_id: int | None = None
    last_user_mid: str | None = None
    notice_floor: int = 0


def canary_seed(seed: int, workspace: str, bot: str) -> str:
    """The canary seed a bot gets for a run: fixed by the run's seed, so is the prompt."""
    return hashlib.sha256(f"parley-test:{seed}:{workspace}:{bot}".encode()).hexdigest()[:32]


def _prepare(
    session: Session, scenarios: Scenarios, bots: BotsFile | None, seed: int
) -> list[Target]:
    """Apply the bots (the file's, else the demo bot when the database has none), tune the
    bots the conversations name for a reproducible run, and find each conversation's account.
    Raises :class:`ConfigError` (naming the line) when a conversation names what is not there."""
    workspace: str | None = None
    if bots is not None:
        apply_bots(session, bots)
        workspace = bots.workspace
    elif not bot_repository.any_bot_exists(session):
        demo = demo_bots()
        apply_bots(session, demo)
        workspace = demo.workspace
    query = select(Bot, Workspace.name).join(Workspace, Workspace.id == Bot.workspace_id)
    if workspace is not None:
        query = query.where(Workspace.name == workspace)
    known = session.execute(query.order_by(Bot.id)).all()
    spec = scenarios.spec
    problems: list[tuple[tuple[str | int, ...], str]] = []
    targets: list[Target] = []
    tuned: set[int] = set()
    for i, conversation in enumerate(spec.conversations):
        name = conversation.bot or spec.bot
        loc: tuple[str | int, ...] = (
            ("conversations", i, "bot") if conversation.bot else ("bot",) if spec.bot else ()
        )
        matches = [(b, ws) for b, ws in known if name is None or b.name == name]
        names = ", ".join(sorted({b.name for b, _ in known})) or "none"
        if not matches:
            problems.append(
                (loc, f"no bot named {name!r} (the bots: {names}); or pass --bots FILE")
            )
            continue
        if len(matches) > 1:
            what = f"bot name {name!r} is ambiguous" if name else "there are several bots"
            problems.append(
                (loc or ("conversations", i), f"{what} ({names}); name one, or pass --bots FILE")
            )
            continue
        bot, ws = matches[0]
        accounts = select(
            ChannelAccount.channel,
            ChannelAccount.external_id,
            MetaApp.app_secret,
            MetaApp.instagram_app_secret,
        ).join(MetaApp, MetaApp.id == ChannelAccount.meta_app_id)
        accounts = accounts.where(ChannelAccount.bot_id == bot.id)
        if conversation.channel is not None:
            accounts = accounts.where(ChannelAccount.channel == conversation.channel)
        row = session.execute(accounts.order_by(ChannelAccount.id).limit(1)).first()
        if row is None:
            on = f" on {conversation.channel}" if conversation.channel else ""
            problems.append(
                (("conversations", i, "channel"), f"bot {bot.name!r} has no account{on}")
            )
            continue
        secret = row.app_secret
        if row.channel == "instagram" and row.instagram_app_secret:
            secret = row.instagram_app_secret
        if bot.id not in tuned:
            _tune(bot, workspace=ws, seed=seed)
            tuned.add(bot.id)
        targets.append(Target(bot.name, row.channel, row.external_id, secret))
        if row.channel == "messenger" and conversation.channel is None:
            for j, turn in enumerate(conversation.turns):
                if turn.delete:
                    loc = ("conversations", i, "turns", j, "delete")
                    problems.append((loc, "Messenger has no unsend"))
    if problems:
        raise scenarios.error(problems)
    session.flush()
    return targets


def _tune(bot: Bot, *, workspace: str, seed: int) -> None:
    """Temperature 0, the run's seed and canary, no burst window (in the run's transaction)."""
    bot.temperature = 0.0
    bot.seed = seed
    bot.canary_seed = canary_seed(seed, workspace, bot.name)
    extra = dict(bot.extra or {})
    extra["policy"] = {**(extra.get("policy") or {}), "burst_window_seconds": 0}
    bot.extra = extra


def _payload(thread: _Thread, turn: Turn, mid: str, reply_mid: str | None) -> dict[str, Any]:
    target = thread.target
    whatsapp = target.channel == "whatsapp"
    if turn.user is not None:
        if whatsapp:
            return simulator.whatsapp_text(
                phone_number_id=target.account, wa_id=thread.user, text=turn.user, message_id=mid
            )
        return simulator.page_text(
            channel=target.channel,
            account=target.account,
            user=thread.user,
            text=turn.user,
            mid=mid,
        )
    if turn.react is not None:
        # The send lane does not run, so the bot's reply has no provider id: a made-up one.
        target_mid = reply_mid or simulator.new_mid(target.channel)
        if whatsapp:
            return simulator.whatsapp_reaction(
                phone_number_id=target.account,
                wa_id=thread.user,
                target_message_id=target_mid,
                emoji=turn.react,
            )
        return simulator.page_reaction(
            channel=target.channel,
            account=target.account,
            user=thread.user,
            target_mid=target_mid,
            emoji=turn.react or None,
        )
    assert thread.last_user_mid is not None  # validated: a delete follows a user turn
    if whatsapp:
        return simulator.whatsapp_revoke(
            phone_number_id=target.account,
            wa_id=thread.user,
            original_message_id=thread.last_user_mid,
        )
    return simulator.page_delete(
        channel=target.channel, account=target.account, user=thread.user, mid=thread.last_user_mid
    )


def _conversation_jobs(session: Session, conversation_id: int) -> list[tuple[int, str]]:
    """The conversation's pending jobs that this process runs: every lane but the send lane
    (``bots.reply`` for its messages, memory folds and anything else naming the conversation)."""
    in_conversation = select(Message.id).where(Message.conversation_id == conversation_id)
    rows = session.execute(
        select(OutboxJob.id, OutboxJob.task)
        .where(
            OutboxJob.state == "pending",
            OutboxJob.task.not_like("webhooks.%"),
            or_(
                OutboxJob.payload["message_id"].as_integer().in_(in_conversation),
                OutboxJob.payload["conversation_id"].as_integer() == conversation_id,
            ),
        )
        .order_by(OutboxJob.id)
    ).all()
    return [(row.id, row.task) for row in rows]


def _drain(factory: sessionmaker[Session], conversation_id: int, timeout: float) -> str | None:
    """Run the conversation's jobs in this process until none is pending, oldest first, each
    through its registered task (``core.jobs.run_job``); an error text when some are still
    pending after ``timeout`` seconds (e.g. the model is unreachable)."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(factory) as session:
            pending = _conversation_jobs(session, conversation_id)
        if not pending:
            return None
        results = [f"{task} {celery_app.tasks[task](job_id)}" for job_id, task in pending]
        if time.monotonic() > deadline:
            return f"no outcome within {timeout:.0f} s ({', '.join(results)})"
        if any(r.endswith((" deferred", " failed")) for r in results):
            time.sleep(0.25)


def _observe(session: Session, thread: _Thread, mid: str | None) -> TurnResult:
    """What the platform recorded for the turn (``mid``: the user's message, when it sent one)."""
    outcome = detail = reply = None
    reasons: list[str] = []
    if mid is not None:
        inbound = session.scalars(
            select(Message).where(
                Message.channel == thread.target.channel, Message.provider_message_id == mid
            )
        ).one_or_none()
        if inbound is None:
            return TurnResult(error="the webhook stored no message")
        thread.conversation_id = inbound.conversation_id
        reasons.extend((inbound.verdict or {}).get("reasons", []))
        row = session.get(OutcomeRow, inbound.id)
        if row is not None:
            outcome, detail = row.kind, row.detail
            answer = session.get(Message, row.reply_id) if row.reply_id else None
            if answer is not None:
                reply = answer.body
                reasons.extend(
                    r for r in (answer.verdict or {}).get("reasons", []) if r not in reasons
                )
    assert thread.conversation_id is not None
    conversation = session.get(ConversationRow, thread.conversation_id)
    assert conversation is not None
    contact = session.get(Contact, conversation.contact_id)
    notices = session.execute(
        select(Notice.id, Notice.kind)
        .where(Notice.conversation_id == conversation.id, Notice.id > thread.notice_floor)
        .order_by(Notice.id)
    ).all()
    if notices:
        thread.notice_floor = notices[-1].id
    return TurnResult(
        outcome=outcome,
        detail=detail,
        reply=reply,
        notices=tuple(n.kind for n in notices),
        reasons=tuple(reasons),
        mode=conversation.mode,
        opted_out=contact is not None and contact.opted_out_at is not None,
    )


def _last_reply_mid(session: Session, conversation_id: int | None) -> str | None:
    """The provider id of the bot's last sent message, when one was sent."""
    if conversation_id is None:
        return None
    mid: str | None = session.scalars(
        select(Message.provider_message_id)
        .where(
            Message.conversation_id == conversation_id,
            Message.direction == "out",
            Message.provider_message_id.is_not(None),
        )
        .order_by(Message.id.desc())
        .limit(1)
    ).first()
    return mid


def _take_jobs(session: Session) -> None:
    """Before a commit: keep the buffered jobs from the broker (this process runs them)."""
    jobs.take_buffer(session)


@contextmanager
def _jobs_stay_here(factory: sessionmaker[Session]) -> Iterator[None]:
    event.listen(factory, "before_commit", _take_jobs)
    try:
        yield
    finally:
        event.remove(factory, "before_commit", _take_jobs)


def run(
    scenarios: Scenarios,
    *,
    bots: BotsFile | None = None,
    seed: int = 0,
    out: Callable[[str], None] = print,
    factory: sessionmaker[Session] | None = None,
    turn_timeout: float | None = None,
) -> Report:
    """Run every conversation of ``scenarios`` and print a line per turn and conversation.

    Commits only through ``factory`` (the process default when None): the caller owns the
    outer transaction and decides whether anything stays (the CLI rolls it all back).
    ``bots`` is a :class:`bots.schemas.BotsFile` to apply first; without it the database's bots
    are used, and the demo bot when there is none. Raises :class:`ConfigError` before any turn
    runs when a conversation names a bot or channel that is not there."""
    factory = factory or make_sessionmaker()
    timeout = turn_timeout or get_settings().inference_timeout + TURN_GRACE_SECONDS
    report = Report()
    with use_sessionmaker(factory), _jobs_stay_here(factory):
        with session_scope(factory) as session:
            targets = _prepare(session, scenarios, bots, seed)
        directory = Directory(factory)
        for i, (conversation, target) in enumerate(
            zip(scenarios.spec.conversations, targets, strict=True)
        ):
            thread = _Thread(target, new_user_id(target.channel))
            out(
                f"conversation {conversation.name!r} ({scenarios.where('conversations', i)}):"
                f" bot {target.bot} on {target.channel}"
            )
            failed = 0
            for j, turn in enumerate(conversation.turns):
                got = _play(factory, directory, thread, turn, timeout)
                failures = check(turn.expect, got)
                line = scenarios.line("conversations", i, "turns", j)
                where = f"{scenarios.source}:{line}"
                report.checked.append(Checked(conversation.name, j + 1, line, got, tuple(failures)))
                if failures:
                    failed += 1
                    out(f"  FAIL turn {j + 1} ({where}): " + "; ".join(failures))
                else:
                    out(f"  PASS turn {j + 1} ({where}): {describe(turn, got)}")
            report.conversations += 1
            report.turns += len(conversation.turns)
            report.turns_failed += failed
            if failed:
                report.conversations_failed += 1
                out(f"FAIL {conversation.name!r}: {failed} of {len(conversation.turns)} failed")
            else:
                out(f"PASS {conversation.name!r}")
    out(report.summary())
    return report


def _play(
    factory: sessionmaker[Session],
    directory: Directory,
    thread: _Thread,
    turn: Turn,
    timeout: float,
) -> TurnResult:
    """Deliver one turn's webhook, run the jobs it caused, and observe the result."""
    mid = simulator.new_mid(thread.target.channel) if turn.user is not None else None
    with session_scope(factory) as session:
        reply_mid = _last_reply_mid(session, thread.conversation_id)
    body, headers = simulator.signed(
        _payload(thread, turn, mid or "", reply_mid), thread.target.secret
    )
    with session_scope(factory) as session:
        intake = service.intake(
            session, thread.target.channel, body, headers["X-Hub-Signature-256"], directory
        )
    if intake.unroutable:
        return TurnResult(error=f"the {thread.target.channel} webhook was unroutable")
    if mid is not None:
        thread.last_user_mid = mid
        with session_scope(factory) as session:
            stored = session.scalars(
                select(Message.conversation_id).where(
                    Message.channel == thread.target.channel, Message.provider_message_id == mid
                )
            ).first()
        if stored is None:
            return TurnResult(error="the webhook stored no message")
        thread.conversation_id = stored
    elif turn.delete:
        thread.last_user_mid = None
    assert thread.conversation_id is not None
    error = _drain(factory, thread.conversation_id, timeout)
    with session_scope(factory) as session:
        got = _observe(session, thread, mid)
    if error is not None:
        return TurnResult(error=error)
    if mid is not None and got.outcome is None and got.error is None:
        # Every stored inbound message ends with exactly one outcome (ARCHITECTURE.md).
        return TurnResult(error="the message got no outcome")
    return got


# --- the command ----------------------------------------------------------------------------------


class CannotRun(Exception):
    """The run could not start: no database or no model (exit code 3)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_model(stack: ExitStack, settings: Settings) -> str:
    """The local model server (``inference.local``) on a free port, stopped with ``stack``."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    base = local.start(
        stack,
        port=_free_port(),
        threads=settings.local_model_threads,
        n_ctx=settings.local_model_ctx,
        log_path=settings.data_dir / "model-server-test.log",
    )
    return local.local_spec(base)


def _services(
    stack: ExitStack, say: Callable[[str], None], environ: MutableMapping[str, str]
) -> None:
    """Postgres and the model: the configured ones (or a running ``parley run``'s), otherwise an
    embedded Postgres (migrated) and the local model server, whose URLs go into ``environ`` (the
    process environment, which the settings read). Raises :class:`CannotRun`."""
    settings = adopt_running_platform()
    if settings.is_production and not (settings.database_url and settings.inference_endpoints):
        raise CannotRun("in production, DATABASE_URL and PARLEY_INFERENCE_ENDPOINTS must be set")
    started_db = False
    if not settings.database_url:
        say("starting embedded Postgres …")
        try:
            pg = embedded.start_postgres(settings.data_dir)
        except embedded.EmbeddedServiceError as exc:
            raise CannotRun(str(exc)) from exc
        stack.callback(pg.stop)
        environ["DATABASE_URL"] = pg.url
        started_db = True
    if not settings.inference_endpoints:
        say("starting the local model server …")
        try:
            environ["PARLEY_INFERENCE_ENDPOINTS"] = _start_model(stack, settings)
        except RuntimeError as exc:
            raise CannotRun(str(exc)) from exc
    reset_settings()
    engine = create_engine(get_settings().require_database_url(), poolclass=NullPool)
    try:
        if started_db:
            migrate.upgrade(engine)
            return
        at_head = migrate.current(engine) == migrate.head()
    except SQLAlchemyError as exc:
        raise CannotRun(f"cannot use the database: {type(exc).__name__}") from exc
    finally:
        engine.dispose()
    if not at_head:
        raise CannotRun("the database is not at the latest migration; run `parley migrate`")


@contextmanager
def rolled_back() -> Iterator[sessionmaker[Session]]:
    """Sessions on one connection whose outer transaction is rolled back at the end: their
    commits release SAVEPOINTs only."""
    with get_engine().connect() as connection:
        outer = connection.begin()
        try:
            yield sessionmaker(
                bind=connection,
                join_transaction_mode="create_savepoint",
                expire_on_commit=False,
                autoflush=False,
            )
        finally:
            outer.rollback()


def _local_broker() -> None:
    """Jobs run in this process; a deferred one still rings the broker (``core.jobs``), which
    for this command is an in-memory one."""
    celery_app.conf.update(broker_url="memory://")


def main(
    path: Path,
    *,
    bots_path: Path | None,
    seed: int,
    out: Callable[[str], None],
    err: Callable[[str], None],
    environ: MutableMapping[str, str],
) -> int:
    """``parley test``: the exit code (0 passed, 1 failed, 2 invalid file, 3 cannot run).
    Both files are validated before anything starts."""
    try:
        scenarios = load_scenarios(path)
        bots = load_bots(bots_path, environ) if bots_path is not None else None
    except ConfigError as exc:
        err(f"error: {exc.message}")
        return 2
    with ExitStack() as stack:
        try:
            _services(stack, lambda m: err(f"parley: {m}"), environ)
            _local_broker()
            with rolled_back() as factory:
                report = run(scenarios, bots=bots, seed=seed, out=out, factory=factory)
        except ConfigError as exc:
            err(f"error: {exc.message}")
            return 2
        except CannotRun as exc:
            err(f"error: {exc}")
            return 3
    return report.exit_code
