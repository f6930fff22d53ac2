"""Transactional outbox and after-commit enqueueing.

``enqueue(session, "bots.reply", message_id=…)`` writes an ``outbox`` row in the caller's
transaction and remembers it; only after that transaction commits is the task sent to Celery, with
the job id as its only argument. If sending fails (Redis down), the commit still stands, the event
``jobs.enqueue_failed`` is logged, and the relay (``jobs.relay``, run by beat) sends it later.

A task body registered with :func:`job` runs through :func:`run_job`, which counts the attempt in
Postgres *before* the work (so a message that kills its worker cannot loop forever), skips jobs that
are already done, and dead-letters a job after ``PARLEY_JOB_MAX_ATTEMPTS`` attempts. A job's
optional ``prepare`` step shares the transaction that counts the attempt. The body marks its job
done with :func:`complete` in the same transaction as its effects.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import lru_cache
from typing import Any, ParamSpec

import structlog
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from core.celery_app import celery_app
from core.config import get_settings
from core.db import session_scope
from core.models import OutboxJob, utcnow

log = structlog.get_logger()
P = ParamSpec("P")

_BUFFER_KEY = "parley.jobs"


def enqueue(session: Session, task: str, **payload: Any) -> OutboxJob:
    """Write the job in the caller's transaction; send it to the broker after commit."""
    job = OutboxJob(task=task, payload=payload, state="pending", attempts=0, available_at=utcnow())
    session.add(job)
    session.flush()
    session.info.setdefault(_BUFFER_KEY, []).append((task, job.id))
    return job


_ENQUEUE_MANY = text(
    """
    INSERT INTO outbox (task, payload, state, attempts, available_at)
    SELECT t.task, t.payload, 'pending', 0, :now
      FROM unnest(CAST(:tasks AS text[]), CAST(:payloads AS jsonb[])) WITH ORDINALITY
        AS t(task, payload, ord)
     ORDER BY t.ord
    RETURNING id, task
    """
)


def enqueue_many(session: Session, work: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
    """:func:`enqueue` for many jobs in one statement (the group-committed intake)."""
    if not work:
        return []
    rows = (
        session.connection()
        .execute(
            _ENQUEUE_MANY,
            {
                "tasks": [task for task, _ in work],
                "payloads": [json.dumps(payload) for _, payload in work],
                "now": utcnow(),
            },
        )
        .all()
    )
    session.info.setdefault(_BUFFER_KEY, []).extend((r.task, r.id) for r in rows)
    return [r.id for r in rows]


def take_buffer(session: Session) -> list[tuple[str, int]]:
    """Take the jobs buffered in this transaction, so the caller rings their doorbells itself
    (after commit, with :func:`send_many`) instead of the after-commit hook."""
    buffered: list[tuple[str, int]] = session.info.pop(_BUFFER_KEY, [])
    return buffered


def send_many(work: Sequence[tuple[str, int]]) -> int:
    """Ring the doorbells of committed jobs in one pipelined broker write; never raises (the
    relay sends what this cannot). Returns how many were handed to the broker."""
    if not work:
        return 0
    try:
        _doorbells().ring(work)
    except Exception as exc:  # noqa: BLE001  # any broker failure is recovered by the relay
        log.warning("jobs.enqueue_failed", jobs=len(work), error=type(exc).__name__)
        return 0
    return len(work)


class Doorbells:
    """Celery task messages for job ids, written straight to the broker's queue lists.

    Celery's ``send_task`` spends most of its time on options, routing and kombu objects that
    are the same for every doorbell (about 0.1 ms of the API's CPU per message, a third of the
    intake's). A doorbell is always the same message, a task name with ``job_id`` as its only
    argument, so this builds Celery's message protocol 2 (the headers, properties and body
    ``send_task`` writes; a test compares the two) for the queue Celery's router picks and
    pushes a batch onto the queue lists in one pipelined write, as kombu's Redis transport
    would (``LPUSH`` of the JSON envelope; priorities are off, so the list is the queue name).
    Countdowns, retries and other options still go through ``send_task`` (:func:`send_now`).
    """

    def __init__(self, redis_url: str, prefix: str = "") -> None:
        import redis

        url = redis_url.replace("redis+socket://", "unix://", 1)
        self._client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        self._prefix = prefix
        self._keys: dict[str, str] = {}
        self._origin = ""
        self._pid = 0

    def _key(self, task: str) -> str:
        key = self._keys.get(task)
        if key is None:
            queue = celery_app.amqp.router.route({}, task)["queue"].name
            key = self._keys[task] = self._prefix + queue
        return key

    def envelope(self, task: str, job_id: int) -> tuple[str, str]:
        """(queue list key, JSON envelope) of the doorbell for ``job_id``."""
        from celery.utils.nodenames import anon_nodename

        if self._pid != os.getpid():  # the origin names the process, as Celery's does
            self._pid, self._origin = os.getpid(), anon_nodename()
        key = self._key(task)
        task_id = str(uuid.uuid4())
        body = f'[[], {{"job_id": {int(job_id)}}}, {_EMBED}]'.encode()
        kwargsrepr = f"{{'job_id': {int(job_id)}}}"
        message = {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": task,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": "()",
                "kwargsrepr": kwargsrepr,
                "origin": self._origin,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": celery_app.thread_oid,
                "argsrepr": "()",
                "kwargsrepr": kwargsrepr,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": key[len(self._prefix) :]},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return key, json.dumps(message)

    def ring(self, work: Sequence[tuple[str, int]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for task, job_id in work:
            key, message = self.envelope(task, job_id)
            pipe.lpush(key, message)
        pipe.execute()


_EMBED = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'


@lru_cache(maxsize=4)
def _doorbells_for(redis_url: str, prefix: str) -> Doorbells:
    return Doorbells(redis_url, prefix)


def _doorbells() -> Doorbells:
    settings = get_settings()
    return _doorbells_for(settings.require_redis_url(), settings.redis_prefix)


def send_now(task: str, job_id: int, countdown: float | None = None) -> bool:
    """Ring the doorbell for one job; never raises (the relay retries what this cannot send)."""
    try:
        celery_app.send_task(task, kwargs={"job_id": job_id}, retry=False, countdown=countdown)
    except Exception as exc:  # noqa: BLE001  # any broker failure is recovered by the relay
        log.warning("jobs.enqueue_failed", task=task, job_id=job_id, error=type(exc).__name__)
        return False
    return True


def flush_after_commit(session: Session) -> None:
    send_many(session.info.pop(_BUFFER_KEY, []))


def drop_buffer(session: Session) -> None:
    session.info.pop(_BUFFER_KEY, None)


def install_session_hooks() -> None:
    """Send buffered jobs after every commit and forget them on rollback (idempotent)."""
    from sqlalchemy import event

    if not event.contains(Session, "after_commit", flush_after_commit):
        event.listen(Session, "after_commit", flush_after_commit)
        event.listen(Session, "after_soft_rollback", _after_soft_rollback)


def _after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:
        drop_buffer(session)


install_session_hooks()


_COMPLETE = text(
    "UPDATE outbox SET state = 'done', done_at = :now"
    " WHERE id = :job_id AND state = 'pending' RETURNING id"
)


def complete(session: Session, job_id: int) -> bool:
    """Mark the job done in the caller's transaction. False if another run already finished it;
    the caller must then roll back so its effects are not applied twice."""
    done = session.execute(_COMPLETE, {"job_id": job_id, "now": utcnow()}).first()
    return done is not None


class AlreadyDone(Exception):
    """Raised inside a job body when :func:`complete` finds the job finished by another run."""


class Defer(Exception):
    """Raised inside a job body that cannot proceed yet (a lease is held, a debounce window is
    open, an earlier chunk is not sent): run it again in ``seconds`` without spending an attempt.
    """

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = max(0.05, seconds)
        self.reason = reason


# Celery countdowns stay well under the visibility timeout; longer waits go through the relay.
MAX_COUNTDOWN = 30.0


# Called as on_dead(session, job_id=…, **payload) in the transaction that dead-letters the job.
DeadHandler = Callable[..., None]

# Called as prepare(session, job_id=…, **payload) in the transaction that counts the attempt, for
# the body's first reads and writes (no external work: that comes after the commit). What it
# returns is the body's first argument; None means the job is finished (it called complete).
Prepare = Callable[..., Any]


def backoff(attempt: int) -> float:
    return float(min(300, 2 ** max(0, attempt - 1)))


# Plain statements on the hot path (no ORM bulk machinery for one row).
_COUNT_ATTEMPT = text(
    "UPDATE outbox SET attempts = attempts + 1, available_at = :until"
    " WHERE id = :job_id AND state = 'pending' RETURNING attempts, payload, task"
)
_DEAD = text("UPDATE outbox SET state = 'dead', done_at = :now WHERE id = :job_id")
_DEFERRED = text(
    "UPDATE outbox SET attempts = attempts - :spent, available_at = :at"
    " WHERE id = :job_id AND state = 'pending'"
)
_FAILED = text(
    "UPDATE outbox SET attempts = attempts + :uncounted, available_at = :at, last_error = :error"
    " WHERE id = :job_id AND state = 'pending'"
)


def run_job(
    job_id: int,
    body: Callable[..., None],
    *,
    on_dead: DeadHandler | None = None,
    factory: sessionmaker[Session] | None = None,
    prepare: Prepare | None = None,
) -> str:
    """Run one job body at most once to completion. Returns what happened (for logs and tests).

    The attempt is counted in a transaction of its own, or, with ``prepare``, in the one that
    also does the body's first database work; either way it commits before the body's external
    work. If that transaction rolls back, nothing of the attempt happened: a deferral spends no
    attempt, and a failure counts it in the transaction that records the failure."""
    settings = get_settings()
    lease = timedelta(seconds=max(settings.outbox_relay_after, 120.0))
    counted: tuple[int, dict[str, Any], str] | None = None
    prepared: Any = None
    try:
        with session_scope(factory) as session:
            row = session.execute(
                _COUNT_ATTEMPT, {"job_id": job_id, "until": utcnow() + lease}
            ).first()
            if row is None:
                return "skipped"
            attempts, payload, task = row
            if attempts > settings.job_max_attempts:
                _dead_letter(session, job_id, task, attempts, payload, on_dead)
                return "dead"
            if prepare is not None:
                counted = (attempts, payload, task)
                prepared = prepare(session, job_id=job_id, **payload)
                if prepared is None:
                    return "done"
    except Exception as exc:
        if counted is None:
            raise
        # The transaction that counted the attempt rolled back with the prepare step.
        return _settle_attempt(job_id, counted[2], counted[0], exc, factory, counted=False)
    try:
        if prepare is None:
            body(job_id=job_id, **payload)
        else:
            body(prepared, job_id=job_id, **payload)
    except Exception as exc:
        return _settle_attempt(job_id, task, attempts, exc, factory, counted=True)
    return "done"


def _dead_letter(
    session: Session,
    job_id: int,
    task: str,
    attempts: int,
    payload: dict[str, Any],
    on_dead: DeadHandler | None,
) -> None:
    session.execute(_DEAD, {"job_id": job_id, "now": utcnow()})
    if on_dead is not None:
        on_dead(session, job_id=job_id, **payload)
    log.error("jobs.dead", task=task, job_id=job_id, attempts=attempts - 1)


def _settle_attempt(
    job_id: int,
    task: str,
    attempts: int,
    exc: Exception,
    factory: sessionmaker[Session] | None,
    *,
    counted: bool,
) -> str:
    """What a run that raised leaves behind. ``counted``: its attempt is committed (else the
    transaction that counted it rolled back)."""
    if isinstance(exc, AlreadyDone):
        return "duplicate"
    if isinstance(exc, Defer):
        # Not an attempt: give back the one counted.
        with session_scope(factory) as session:
            session.execute(
                _DEFERRED,
                {
                    "job_id": job_id,
                    "spent": 1 if counted else 0,
                    "at": utcnow() + timedelta(seconds=exc.seconds),
                },
            )
        if exc.seconds <= MAX_COUNTDOWN:
            send_now(task, job_id, countdown=exc.seconds)
        return "deferred"
    delay = backoff(attempts)
    with session_scope(factory) as session:
        session.execute(
            _FAILED,
            {
                "job_id": job_id,
                "uncounted": 0 if counted else 1,
                "at": utcnow() + timedelta(seconds=delay),
                "error": f"{type(exc).__name__}: {str(exc)[:200]}",
            },
        )
    log.warning(
        "jobs.failed",
        task=task,
        job_id=job_id,
        attempt=attempts,
        retry_in=delay,
        error=type(exc).__name__,
    )
    return "failed"


def job(
    name: str, *, on_dead: DeadHandler | None = None, prepare: Prepare | None = None
) -> Callable[[Callable[..., None]], Any]:
    """Register ``body(job_id=…, **payload)`` (with ``prepare``: ``body(prepared, job_id=…,
    **payload)``) as the Celery task ``name`` run through the outbox."""

    def register(body: Callable[..., None]) -> Any:
        @celery_app.task(name=name)  # type: ignore[untyped-decorator]  # celery is untyped
        def task(job_id: int) -> str:
            return run_job(job_id, body, on_dead=on_dead, prepare=prepare)

        return task

    return register


def relay(factory: sessionmaker[Session] | None = None, *, limit: int = 500) -> int:
    """Re-send pending jobs that are due and were not picked up; returns how many were sent."""
    settings = get_settings()
    now = utcnow()
    stale = now - timedelta(seconds=settings.outbox_relay_after)
    with session_scope(factory) as session:
        rows = session.execute(
            select(OutboxJob.id, OutboxJob.task)
            .where(
                OutboxJob.state == "pending",
                OutboxJob.available_at <= now,
                OutboxJob.created_at <= stale,
            )
            .order_by(OutboxJob.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if rows:
            session.execute(
                update(OutboxJob)
                .where(OutboxJob.id.in_([r.id for r in rows]))
                .values(
                    available_at=now + timedelta(seconds=settings.outbox_relay_after),
                    enqueued_at=now,
                )
            )
    sent = sum(1 for r in rows if send_now(r.task, r.id))
    if rows:
        log.info("jobs.relayed", due=len(rows), sent=sent)
    return sent


@celery_app.task(name="jobs.relay")  # type: ignore[untyped-decorator]  # celery is untyped
def relay_task() -> int:
    return relay()
