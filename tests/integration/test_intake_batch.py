"""The group-committed intake stores exactly what applying each delivery alone stores."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session, sessionmaker

from core.models import Contact, Conversation, Message, OutboxJob
from tests.integration import test_intake_channels as recorded
from webhooks import repository, service, simulator
from webhooks.directory import Directory

bot = recorded.bot  # the fixture: one Meta app, one account per channel


def _delivery(db: Session, channel: str, body: bytes) -> service.Delivery:
    app = repository.meta_apps(db)[-1]
    return service.Delivery(channel, app, service.parse(channel, body))


def _text(bot: recorded.ChannelsBot, wa_id: str, mid: str, at: datetime, text: str) -> bytes:
    payload = simulator.whatsapp_text(
        phone_number_id=bot.accounts["whatsapp"],
        wa_id=wa_id,
        text=text,
        message_id=mid,
        name=f"Name {wa_id[-2:]}",
        timestamp=int(at.timestamp()),
    )
    return simulator.encode(payload)


def _deliveries(db: Session, bot: recorded.ChannelsBot) -> list[service.Delivery]:
    """Texts from new and returning contacts, a message repeated inside the batch, every
    recorded payload of every channel (edits, deletes, echoes, statuses, handover, media, story
    mentions, standby, unroutable …) in between, and texts after them."""
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    texts = [
        _text(bot, "15550400001", "wamid.B1", t0, "first"),
        _text(bot, "15550400002", "wamid.B2", t0 + timedelta(seconds=1), "second"),
        _text(bot, "15550400001", "wamid.B3", t0 + timedelta(seconds=2), "third"),
        _text(bot, "15550400001", "wamid.B3", t0 + timedelta(seconds=2), "third"),  # Meta's retry
    ]
    out = [_delivery(db, "whatsapp", body) for body in texts]
    for channel, name in recorded.CASES:
        out.append(_delivery(db, channel, recorded._payload(bot, channel, name)))
    out.append(
        _delivery(db, "whatsapp", _text(bot, "15550400002", "wamid.B4", t0 + timedelta(3), "4th"))
    )
    return out


def _state(db: Session) -> dict[str, Any]:
    snap: dict[str, Any] = json.loads(json.dumps(recorded.snapshot(db), default=str))
    db.expire_all()
    snap["order"] = list(
        db.execute(
            select(Message.provider_message_id)
            .where(Message.direction == "in")
            .order_by(Message.id)
        ).scalars()
    )
    snap["windows"] = sorted(
        (str(c.last_inbound_at), c.mode) for c in db.execute(select(Conversation)).scalars()
    )
    snap["contacts"] = sorted(
        (c.channel, c.external_id, c.display_name) for c in db.execute(select(Contact)).scalars()
    )
    snap["job_count"] = db.execute(select(func.count()).select_from(OutboxJob)).scalar_one()
    return snap


def _run(
    connection: Connection,
    factory: sessionmaker[Session],
    db: Session,
    apply: Callable[[Session], list[service.IntakeResult]],
) -> tuple[list[dict[str, int]], dict[str, Any]]:
    savepoint = connection.begin_nested()
    with factory() as session:
        results = apply(session)
        session.commit()
    state = _state(db)
    savepoint.rollback()
    return [r.as_json() for r in results], state


def test_one_batch_stores_what_each_delivery_alone_stores(
    connection: Connection, factory: sessionmaker[Session], db: Session, bot: Any
) -> None:
    deliveries = _deliveries(db, bot)
    directory = Directory(factory)

    def batched(session: Session) -> list[service.IntakeResult]:
        return service.apply_deliveries(session, deliveries, directory)

    def alone(session: Session) -> list[service.IntakeResult]:
        return [
            service.store_events(session, d.app, d.events, channel=d.channel) for d in deliveries
        ]

    batch_results, batch_state = _run(connection, factory, db, batched)
    alone_results, alone_state = _run(connection, factory, db, alone)
    assert batch_state == alone_state
    assert batch_results == alone_results
    # The batch really stored things (the comparison is not between two empty databases).
    assert batch_state["order"][:3] == ["wamid.B1", "wamid.B2", "wamid.B3"]
    assert batch_state["order"][-1] == "wamid.B4"
    assert batch_results[3] == {**batch_results[3], "stored": 0, "duplicates": 1}
    assert ("whatsapp", "15550400001", "Name 01") in batch_state["contacts"]


def test_a_batch_of_only_messages_and_statuses_is_a_few_statements(
    connection: Connection, factory: sessionmaker[Session], db: Session, bot: Any
) -> None:
    from sqlalchemy import event

    t0 = datetime.now(UTC).replace(microsecond=0)
    deliveries = [
        _delivery(
            db,
            "whatsapp",
            _text(bot, f"155504100{i:02d}", f"wamid.S{i}", t0 + timedelta(seconds=i), "hi"),
        )
        for i in range(30)
    ]
    deliveries.append(
        _delivery(
            db,
            "whatsapp",
            simulator.encode(
                simulator.whatsapp_status(
                    phone_number_id=bot.accounts["whatsapp"],
                    message_id="wamid.UNKNOWN",
                    status="read",
                    recipient_id="1",
                )
            ),
        )
    )
    directory = Directory(factory)
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    with factory() as session:
        directory.routes(session, {("whatsapp", bot.accounts["whatsapp"])})  # warm the cache
        event.listen(connection, "before_cursor_execute", count)
        try:
            results = service.apply_deliveries(session, deliveries, directory)
        finally:
            event.remove(connection, "before_cursor_execute", count)
        session.commit()
    assert [len(r.stored) for r in results] == [1] * 30 + [0]
    assert results[-1].statuses == 1
    # Threads, messages (+ windows), outbox, statuses: not one statement per message.
    writes = [s for s in statements if not s.lstrip().upper().startswith(("SAVEPOINT", "RELEASE"))]
    assert len(writes) <= 5, writes
    # The same contacts again: their conversations are remembered, so no thread statement.
    again = [
        _delivery(
            db,
            "whatsapp",
            _text(bot, f"155504100{i:02d}", f"wamid.T{i}", t0 + timedelta(seconds=60), "again"),
        )
        for i in range(30)
    ]
    statements.clear()
    with factory() as session:
        event.listen(connection, "before_cursor_execute", count)
        try:
            results = service.apply_deliveries(session, again, directory)
        finally:
            event.remove(connection, "before_cursor_execute", count)
        session.commit()
    assert [len(r.stored) for r in results] == [1] * 30
    assert not [s for s in statements if "INTO contacts" in s], statements


@pytest.mark.parametrize("ttl", [0.0, 60.0])
def test_routes_are_read_once_per_ttl_and_unknown_accounts_at_once(
    connection: Connection, factory: sessionmaker[Session], bot: Any, ttl: float
) -> None:
    from sqlalchemy import event

    now = [0.0]
    directory = Directory(factory, ttl=ttl, clock=lambda: now[0])
    key = ("whatsapp", bot.accounts["whatsapp"])
    missing = ("whatsapp", "999999999")
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "channel_accounts" in statement:
            reads.append(statement)

    event.listen(connection, "before_cursor_execute", count)
    try:
        with factory() as session:
            assert set(directory.routes(session, {key, missing})) == {key}
            assert len(reads) == 1
            now[0] = 1.0
            assert set(directory.routes(session, {key, missing})) == {key}
            assert len(reads) == (2 if ttl == 0 else 1)  # the miss is cached too
            directory.routes(session, {("messenger", bot.accounts["messenger"])})
            assert len(reads) == (3 if ttl == 0 else 2)  # a key never seen is read at once
            now[0] = 61.0
            directory.routes(session, {key})
            assert len(reads) == (4 if ttl == 0 else 3)  # expired
    finally:
        event.remove(connection, "before_cursor_execute", count)


def test_apps_are_cached_and_forced_reads_are_rate_limited(
    factory: sessionmaker[Session], bot: Any
) -> None:
    now = [0.0]
    directory = Directory(factory, ttl=5.0, clock=lambda: now[0])
    assert not directory.apps_fresh()
    apps = directory.apps()
    assert apps[-1].app_secret == bot.app_secret
    assert directory.apps_fresh()
    now[0] = 5.0
    assert not directory.apps_fresh()
    assert directory.may_force() and not directory.may_force()
    now[0] = 6.0
    assert directory.may_force()


def test_one_bad_delivery_fails_alone_and_the_rest_of_its_batch_is_acknowledged(
    factory: sessionmaker[Session], db: Session, bot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from webhooks.batcher import IntakeBatcher

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(repository, "upsert_reaction", broken)
    t0 = datetime.now(UTC).replace(microsecond=0)
    good = [
        _delivery(db, "whatsapp", _text(bot, "15550420001", f"wamid.G{i}", t0, "hi"))
        for i in range(2)
    ]
    bad = _delivery(db, "messenger", recorded._payload(bot, "messenger", "reaction"))
    batcher = IntakeBatcher(factory, Directory(factory), max_requests=10, max_wait=0.5)
    futures = [batcher.submit(d) for d in (good[0], bad, good[1])]
    assert len(futures[0].result(timeout=10).stored) == 1
    assert len(futures[2].result(timeout=10).stored) == 1
    with pytest.raises(RuntimeError, match="boom"):
        futures[1].result(timeout=10)
    stats = batcher.stats()
    assert (stats.retried, stats.requests, stats.largest) == (1, 2, 1)
    stored = db.execute(
        select(Message.provider_message_id).where(Message.provider_message_id.like("wamid.G%"))
    ).scalars()
    assert sorted(filter(None, stored)) == ["wamid.G0", "wamid.G1"]


def test_a_request_withdrawn_before_its_batch_starts_is_not_applied(
    factory: sessionmaker[Session], db: Session, bot: Any
) -> None:
    from webhooks.batcher import IntakeBatcher

    t0 = datetime.now(UTC).replace(microsecond=0)
    batcher = IntakeBatcher(factory, Directory(factory), max_requests=10, max_wait=0.5)
    kept = batcher.submit(
        _delivery(db, "whatsapp", _text(bot, "15550430001", "wamid.K1", t0, "kept"))
    )
    gone = batcher.submit(
        _delivery(db, "whatsapp", _text(bot, "15550430001", "wamid.K2", t0, "gone"))
    )
    assert gone.cancel()  # the client hung up while the batch was still collecting
    assert len(kept.result(timeout=10).stored) == 1
    stored = db.execute(
        select(Message.provider_message_id).where(Message.provider_message_id.like("wamid.K%"))
    ).scalars()
    assert list(stored) == ["wamid.K1"]


def test_a_remembered_conversation_that_was_erased_is_created_again(
    factory: sessionmaker[Session], db: Session, bot: Any
) -> None:
    from sqlalchemy import delete

    from webhooks.batcher import IntakeBatcher

    t0 = datetime.now(UTC).replace(microsecond=0)
    directory = Directory(factory)
    batcher = IntakeBatcher(factory, directory, max_requests=10, max_wait=0.5)
    first = _delivery(db, "whatsapp", _text(bot, "15550440001", "wamid.E1", t0, "hello"))
    assert len(batcher.apply(first).stored) == 1
    # The contact asks to be erased: contact, conversation and messages go.
    db.execute(delete(Contact).where(Contact.external_id == "15550440001"))
    db.commit()
    later = [
        _delivery(db, "whatsapp", _text(bot, "15550440001", "wamid.E2", t0, "back again")),
        _delivery(db, "whatsapp", _text(bot, "15550440002", "wamid.E3", t0, "someone else")),
    ]
    futures = [batcher.submit(d) for d in later]
    assert [len(f.result(timeout=10).stored) for f in futures] == [1, 1]
    assert batcher.stats().retried == 1  # the stale conversation failed the batch once
    stored = db.execute(
        select(Message.provider_message_id, Message.conversation_id)
        .where(Message.provider_message_id.in_(["wamid.E2", "wamid.E3"]))
        .order_by(Message.id)
    ).all()
    assert [m for m, _ in stored] == ["wamid.E2", "wamid.E3"]
    assert db.get(Conversation, stored[0][1]) is not None
