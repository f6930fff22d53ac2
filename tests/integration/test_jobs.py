"""The transactional outbox: jobs leave only after commit, the relay re-sends what never ran."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from core import db as core_db
from core import jobs
from core.config import get_settings
from core.models import OutboxJob, utcnow


def _queue(name: str = "conversations") -> str:
    return f"{get_settings().redis_prefix}{name}"


def _task_ids(client: redis.Redis, queue: str) -> list[int]:
    ids = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        ids.append(body[1]["job_id"])
    return ids


def test_job_is_sent_after_commit_only(
    factory: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    session = factory()
    job = jobs.enqueue(session, "bots.reply", message_id=1)
    assert job.id not in _task_ids(redis_client, _queue())
    session.commit()
    assert job.id in _task_ids(redis_client, _queue())
    session.close()


def test_rollback_drops_buffered_jobs(
    factory: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    session = factory()
    job = jobs.enqueue(session, "bots.reply", message_id=2)
    job_id = job.id
    session.rollback()
    session.commit()
    assert job_id not in _task_ids(redis_client, _queue())
    session.close()


def test_tasks_are_routed_to_their_lane(
    factory: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    session = factory()
    job = jobs.enqueue(session, "webhooks.send", message_id=3)
    session.commit()
    assert job.id in _task_ids(redis_client, _queue("send"))
    assert job.id not in _task_ids(redis_client, _queue("conversations"))
    session.close()


def test_relay_resends_stale_pending_jobs_once(
    factory: sessionmaker[Session], db: Session, redis_client: redis.Redis
) -> None:
    old = utcnow() - timedelta(minutes=5)
    stale = OutboxJob(
        task="bots.reply",
        payload={"message_id": 9},
        state="pending",
        attempts=0,
        available_at=old,
        created_at=old,
    )
    fresh = OutboxJob(
        task="bots.reply",
        payload={"message_id": 10},
        state="pending",
        attempts=0,
        available_at=utcnow(),
    )
    done = OutboxJob(
        task="bots.reply",
        payload={"message_id": 11},
        state="done",
        attempts=1,
        available_at=old,
        created_at=old,
    )
    db.add_all([stale, fresh, done])
    db.commit()
    assert jobs.relay(factory) >= 1
    ids = _task_ids(redis_client, _queue())
    assert ids.count(stale.id) == 1 and fresh.id not in ids and done.id not in ids
    # Its next chance is pushed forward, so the next tick does not send it again.
    jobs.relay(factory)
    assert _task_ids(redis_client, _queue()).count(stale.id) == 1


def test_a_failing_body_backs_off_and_is_dead_lettered(
    factory: sessionmaker[Session], db: Session
) -> None:
    deaths: list[int] = []

    def body(*, job_id: int, n: int) -> None:
        raise RuntimeError("boom")

    def on_dead(session: Session, *, job_id: int, **payload: object) -> None:
        deaths.append(job_id)

    job = jobs.enqueue(db, "bots.reply", n=1)
    db.commit()
    limit = get_settings().job_max_attempts
    results = [jobs.run_job(job.id, body, on_dead=on_dead, factory=factory) for _ in range(limit)]
    assert results == ["failed"] * limit
    db.expire_all()
    row = db.get(OutboxJob, job.id)
    assert row is not None and row.attempts == limit and row.last_error == "RuntimeError: boom"
    assert row.available_at > utcnow()
    assert jobs.run_job(job.id, body, on_dead=on_dead, factory=factory) == "dead"
    assert deaths == [job.id]
    assert jobs.run_job(job.id, body, on_dead=on_dead, factory=factory) == "skipped"


def test_complete_is_conditional(db: Session) -> None:
    job = jobs.enqueue(db, "bots.reply", n=1)
    assert jobs.complete(db, job.id) is True
    assert jobs.complete(db, job.id) is False
    db.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(state="pending"))


@pytest.mark.parametrize(("attempt", "delay"), [(1, 1.0), (2, 2.0), (5, 16.0), (20, 300.0)])
def test_backoff_grows_and_is_capped(attempt: int, delay: float) -> None:
    assert jobs.backoff(attempt) == delay


def test_a_prepare_step_runs_in_the_attempt_transaction(
    factory: sessionmaker[Session], db: Session
) -> None:
    seen: list[tuple[int, object]] = []

    def prepare(session: Session, *, job_id: int, n: int) -> int:
        # The attempt is counted in this very transaction.
        attempts = session.get(OutboxJob, job_id).attempts  # type: ignore[union-attr]
        assert attempts == 1
        return n * 10

    def body(prepared: int, *, job_id: int, n: int) -> None:
        seen.append((job_id, prepared))
        with core_db.session_scope(factory) as session:
            assert jobs.complete(session, job_id)

    job = jobs.enqueue(db, "bots.reply", n=4)
    db.commit()
    assert jobs.run_job(job.id, body, prepare=prepare, factory=factory) == "done"
    assert seen == [(job.id, 40)]
    assert jobs.run_job(job.id, body, prepare=prepare, factory=factory) == "skipped"


def test_a_prepare_step_that_finishes_the_job_skips_the_body(
    factory: sessionmaker[Session], db: Session
) -> None:
    def prepare(session: Session, *, job_id: int, n: int) -> None:
        assert jobs.complete(session, job_id)

    def body(prepared: object, *, job_id: int, n: int) -> None:
        raise AssertionError("the job was finished by its prepare step")

    job = jobs.enqueue(db, "bots.reply", n=1)
    db.commit()
    assert jobs.run_job(job.id, body, prepare=prepare, factory=factory) == "done"
    db.expire_all()
    assert db.get(OutboxJob, job.id).state == "done"  # type: ignore[union-attr]


def test_a_failing_prepare_step_still_counts_its_attempt_and_is_dead_lettered(
    factory: sessionmaker[Session], db: Session
) -> None:
    """The failure rolls back the transaction that counted the attempt; the attempt is counted
    again where the failure is recorded, so a poison job still ends dead."""
    deaths: list[int] = []

    def prepare(session: Session, *, job_id: int, n: int) -> int:
        raise RuntimeError("boom")

    def body(prepared: int, *, job_id: int, n: int) -> None:
        raise AssertionError("never reached")

    def on_dead(session: Session, *, job_id: int, **payload: object) -> None:
        deaths.append(job_id)

    job = jobs.enqueue(db, "bots.reply", n=1)
    db.commit()
    limit = get_settings().job_max_attempts
    results = [
        jobs.run_job(job.id, body, prepare=prepare, on_dead=on_dead, factory=factory)
        for _ in range(limit)
    ]
    assert results == ["failed"] * limit
    db.expire_all()
    row = db.get(OutboxJob, job.id)
    assert row is not None and row.attempts == limit and row.last_error == "RuntimeError: boom"
    assert jobs.run_job(job.id, body, prepare=prepare, on_dead=on_dead, factory=factory) == "dead"
    assert deaths == [job.id]


def test_a_prepare_step_that_defers_spends_no_attempt(
    factory: sessionmaker[Session], db: Session
) -> None:
    def prepare(session: Session, *, job_id: int, n: int) -> int:
        raise jobs.Defer(5.0, "not yet")

    def body(prepared: int, *, job_id: int, n: int) -> None:
        raise AssertionError("never reached")

    job = jobs.enqueue(db, "bots.reply", n=1)
    db.commit()
    assert jobs.run_job(job.id, body, prepare=prepare, factory=factory) == "deferred"
    db.expire_all()
    row = db.get(OutboxJob, job.id)
    assert row is not None and row.attempts == 0 and row.state == "pending"
    assert row.available_at > utcnow()


def _normalized(raw: bytes | str) -> dict[str, object]:
    """A queued Celery message with its per-message ids replaced by their roles."""
    message = json.loads(raw)
    task_id = message["headers"]["id"]
    assert message["headers"]["root_id"] == message["properties"]["correlation_id"] == task_id
    for part, field in (
        ("headers", "id"),
        ("headers", "root_id"),
        ("properties", "correlation_id"),
        ("properties", "delivery_tag"),
    ):
        message[part][field] = field
    # send_task fills in the configured time limits only when the task is registered in the
    # sending process (the API registers none); with none given the worker applies the same
    # configured limits.
    message["headers"]["timelimit"] = "timelimit"
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return dict(message)


@pytest.mark.parametrize(
    ("task", "queue"), [("bots.reply", "conversations"), ("webhooks.send", "send")]
)
def test_doorbells_are_the_messages_celery_itself_sends(
    redis_client: redis.Redis, task: str, queue: str
) -> None:
    from core.celery_app import celery_app

    key = _queue(queue)
    redis_client.delete(key)
    celery_app.send_task(
        task, kwargs={"job_id": 4321}, retry=False, argsrepr="()", kwargsrepr="{'job_id': 4321}"
    )
    assert jobs.send_many([(task, 4321)]) == 1
    ours, celerys = redis_client.lrange(key, 0, -1)  # LPUSH: the newest first
    redis_client.delete(key)
    ours_n, celerys_n = _normalized(ours), _normalized(celerys)
    for part in ("headers", "properties", "body"):
        assert ours_n[part] == celerys_n[part], part
    assert ours_n == celerys_n
    assert json.loads(ours)["headers"]["id"] != json.loads(celerys)["headers"]["id"]


def test_doorbells_go_out_in_one_write_per_batch(redis_client: redis.Redis) -> None:
    key = _queue()
    redis_client.delete(key)
    assert jobs.send_many([("bots.reply", 1), ("webhooks.send", 2), ("bots.reply", 3)]) == 3
    assert _task_ids(redis_client, key) == [3, 1]
    assert _task_ids(redis_client, _queue("send"))[0] == 2
    redis_client.delete(key)


def test_doorbells_report_a_broker_that_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.processes import free_port

    jobs._doorbells_for.cache_clear()
    monkeypatch.setattr(get_settings(), "redis_url", f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert jobs.send_many([("bots.reply", 1)]) == 0
    finally:
        jobs._doorbells_for.cache_clear()
