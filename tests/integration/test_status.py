"""Status webhooks: applied monotonically, only for the signing app's accounts, and
group-committed (one transaction for many requests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from core.models import Conversation, Message, OutboundChunk, utcnow
from tests.support import databases
from tests.support.factories import WhatsAppBot, create_whatsapp_bot
from webhooks import repository, service, simulator
from webhooks.batcher import BatcherStats, IntakeBatcher
from webhooks.channels.events import StatusUpdate
from webhooks.directory import Directory


def _sent_message(db: Session, bot: WhatsAppBot, client: TestClient, wa_id: str, n: int) -> int:
    """A delivered-to-Meta outbound message of ``n`` chunks with wamids ``wamid.<id>.<idx>``."""
    payload = simulator.whatsapp_text(phone_number_id=bot.phone_number_id, wa_id=wa_id, text="hi")
    body, headers = simulator.signed(payload, bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200
    db.expire_all()
    conversation_id = (
        db.execute(
            select(Message.conversation_id)
            .where(Message.direction == "in")
            .order_by(Message.id.desc())
        )
        .scalars()
        .first()
    )
    assert conversation_id is not None
    return _outbound(db, conversation_id, n)


def _outbound(db: Session, conversation_id: int, n: int, state: str = "sent") -> int:
    conversation = db.get(Conversation, conversation_id)
    assert conversation is not None
    message = Message(
        workspace_id=conversation.workspace_id,
        conversation_id=conversation_id,
        direction="out",
        channel="whatsapp",
        kind="text",
        body="x",
        status="sending",
        attempts=1,
    )
    db.add(message)
    db.flush()
    outbound = repository.outbound(db, message.id)
    assert outbound is not None
    repository.create_chunks(db, outbound, [f"part {i}" for i in range(n)])
    for chunk_id in repository.chunk_ids(db, message.id):
        repository.claim_chunk(db, chunk_id, now=utcnow())
        if state == "sent":
            idx = db.get(OutboundChunk, chunk_id).idx  # type: ignore[union-attr]
            repository.mark_sent(
                db, chunk_id, provider_message_id=f"wamid.{message.id}.{idx}", now=utcnow()
            )
        else:
            repository.move_chunk(db, chunk_id, from_states=["sending"], to=state, error=None)
    repository.refresh_message_status(db, [message.id])
    db.commit()
    return message.id


def _post_status(
    client: TestClient,
    bot: WhatsAppBot,
    wamid: str,
    status: str,
    *,
    secret: str | None = None,
    callback: str | None = None,
) -> None:
    payload = simulator.whatsapp_status(
        phone_number_id=bot.phone_number_id,
        message_id=wamid,
        status=status,
        recipient_id="1",
        callback_data=callback,
        error_code=131026 if status == "failed" else None,
    )
    body, headers = simulator.signed(payload, secret or bot.app_secret)
    r = client.post("/webhooks/whatsapp", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["statuses"] == 1


def _chunks(db: Session, message_id: int) -> list[OutboundChunk]:
    db.expire_all()
    return list(
        db.execute(
            select(OutboundChunk)
            .where(OutboundChunk.message_id == message_id)
            .order_by(OutboundChunk.idx)
        ).scalars()
    )


def test_statuses_only_move_forward_whatever_order_and_repeats(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    message_id = _sent_message(db, wa_bot, client, "15550200001", 1)
    wamid = f"wamid.{message_id}.0"
    for status in ("read", "delivered", "sent", "failed"):
        for _ in range(3):
            _post_status(client, wa_bot, wamid, status)
    (chunk,) = _chunks(db, message_id)
    assert chunk.state == "sent" and chunk.delivery == "read"
    db.expire_all()
    assert db.get(Message, message_id).status == "sent"  # type: ignore[union-attr]


def test_delivered_then_read_and_a_failed_status_before_delivery(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    message_id = _sent_message(db, wa_bot, client, "15550200002", 2)
    _post_status(client, wa_bot, f"wamid.{message_id}.0", "delivered")
    _post_status(client, wa_bot, f"wamid.{message_id}.0", "read")
    _post_status(client, wa_bot, f"wamid.{message_id}.1", "failed")
    first, second = _chunks(db, message_id)
    assert (first.state, first.delivery) == ("sent", "read")
    assert (second.state, second.delivery) == ("failed", None)
    assert second.last_error == "status failed code 131026"


def test_a_status_signed_by_another_app_changes_nothing(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    other = create_whatsapp_bot(db)
    db.commit()
    message_id = _sent_message(db, wa_bot, client, "15550200003", 1)
    # The other tenant's app signs a status naming this tenant's number and message.
    _post_status(client, wa_bot, f"wamid.{message_id}.0", "read", secret=other.app_secret)
    (chunk,) = _chunks(db, message_id)
    assert chunk.delivery is None


def test_an_unresolved_send_is_settled_only_through_its_callback_data(
    client: TestClient, db: Session, wa_bot: WhatsAppBot
) -> None:
    message_id = _sent_message(db, wa_bot, client, "15550200004", 1)
    db.expire_all()
    conversation_id = db.get(Message, message_id).conversation_id  # type: ignore[union-attr]
    unknown = _outbound(db, conversation_id, 1, state="unknown")
    _post_status(client, wa_bot, "wamid.NEW", "delivered", callback=f"{unknown}:0")
    (chunk,) = _chunks(db, unknown)
    assert (chunk.state, chunk.provider_message_id, chunk.delivery) == (
        "sent",
        "wamid.NEW",
        "delivered",
    )
    db.expire_all()
    assert db.get(Message, unknown).status == "sent"  # type: ignore[union-attr]
    # A sent chunk is no longer found by its callback data (a late webhook of a resend).
    _post_status(client, wa_bot, "wamid.OTHER", "read", callback=f"{unknown}:0")
    (chunk,) = _chunks(db, unknown)
    assert chunk.provider_message_id == "wamid.NEW" and chunk.delivery == "delivered"


# --- group commit -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_engine(template_db: str) -> Iterator[Engine]:
    """A committed database: the batcher's thread and the requests use their own connections."""
    name = databases.create_database("parley_status", template=template_db)
    engine = create_engine(databases.url_for(name), pool_size=4, max_overflow=30)
    yield engine
    engine.dispose()
    databases.drop_database(name)


@pytest.mark.parametrize("overlap", [False, True])
def test_concurrent_requests_share_one_commit_and_each_waits_for_it(
    live_engine: Engine, overlap: bool
) -> None:
    factory = sessionmaker(bind=live_engine, expire_on_commit=False)
    with factory() as session:
        bot = create_whatsapp_bot(session)
        session.commit()
        app = repository.meta_apps(session)[-1]
        conversation_id = _seed_conversation(session, bot)
        message_id = _outbound(session, conversation_id, 20)
    commits: list[int] = []

    def count(_: object) -> None:
        commits.append(1)

    event.listen(live_engine, "commit", count)
    batcher = IntakeBatcher(
        factory, Directory(factory), max_requests=50, max_wait=0.3, overlap=overlap
    )
    results: list[service.IntakeResult] = []
    start = threading.Barrier(20)

    def deliver(idx: int) -> None:
        status = StatusUpdate(
            channel="whatsapp",
            account_id=bot.phone_number_id,
            message_id=f"wamid.{message_id}.{idx}",
            status="delivered",
            timestamp=datetime.now(UTC),
        )
        start.wait()
        results.append(batcher.apply(service.Delivery("whatsapp", app, [status])))

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    event.remove(live_engine, "commit", count)
    stats = batcher.stats()
    assert stats.requests == 20
    assert stats.batches == len(commits) < 20  # fewer commits than requests
    assert stats.largest > 1
    assert [r.statuses for r in results] == [1] * 20
    # Each request returned only after its batch committed: everything is visible now.
    with factory() as session:
        delivered = session.execute(
            select(OutboundChunk.delivery).where(OutboundChunk.message_id == message_id)
        ).scalars()
        assert set(delivered) == {"delivered"}


def test_the_writer_reconnects_when_its_connection_died(live_engine: Engine) -> None:
    """The writer's engine does not ping at checkout; a dead connection costs one re-apply."""
    writer = create_engine(live_engine.url, pool_size=1, max_overflow=0, pool_pre_ping=False)
    factory = sessionmaker(bind=writer, expire_on_commit=False)
    with factory() as session:
        bot = create_whatsapp_bot(session)
        session.commit()
        app = repository.meta_apps(session)[-1]
        conversation_id = _seed_conversation(session, bot)
        message_id = _outbound(session, conversation_id, 1)
    batcher = IntakeBatcher(factory, Directory(factory))

    def deliver(status: str) -> service.IntakeResult:
        update = StatusUpdate(
            "whatsapp", bot.phone_number_id, f"wamid.{message_id}.0", status, datetime.now(UTC)
        )
        return batcher.apply(service.Delivery("whatsapp", app, [update]))

    try:
        assert deliver("delivered").statuses == 1
        with writer.connect() as conn:  # the writer's one pooled connection
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with live_engine.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(backend)})").scalar()
        assert deliver("read").statuses == 1
        assert batcher.stats() == BatcherStats(batches=2, requests=2, largest=1, retried=0)
        with factory() as session:
            delivered = session.execute(
                select(OutboundChunk.delivery).where(OutboundChunk.message_id == message_id)
            ).scalars()
            assert set(delivered) == {"read"}
    finally:
        writer.dispose()


def test_with_overlapping_commits_a_bad_delivery_still_fails_alone(
    live_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = sessionmaker(bind=live_engine, expire_on_commit=False)
    with factory() as session:
        bot = create_whatsapp_bot(session)
        session.commit()
        app = repository.meta_apps(session)[-1]
        conversation_id = _seed_conversation(session, bot)
        message_id = _outbound(session, conversation_id, 6)
    original = repository.apply_statuses

    def breaks_on_bad(session: Session, statuses: Any, *, now: datetime) -> int:
        if any(s.status.message_id == "wamid.BAD" for s in statuses):
            raise RuntimeError("boom")
        return original(session, statuses, now=now)

    monkeypatch.setattr(repository, "apply_statuses", breaks_on_bad)
    batcher = IntakeBatcher(
        factory, Directory(factory), max_requests=50, max_wait=0.3, overlap=True
    )

    def delivery(wamid: str) -> service.Delivery:
        update = StatusUpdate(
            "whatsapp", bot.phone_number_id, wamid, "delivered", datetime.now(UTC)
        )
        return service.Delivery("whatsapp", app, [update])

    wamids = [f"wamid.{message_id}.{i}" for i in range(6)]
    futures = [batcher.submit(delivery(w)) for w in [*wamids[:3], "wamid.BAD", *wamids[3:]]]
    bad = futures.pop(3)
    assert [f.result(timeout=10).statuses for f in futures] == [1] * 6
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(timeout=10)
    assert batcher.stats().retried >= 1
    with factory() as session:
        delivered = session.execute(
            select(OutboundChunk.delivery).where(OutboundChunk.message_id == message_id)
        ).scalars()
        assert set(delivered) == {"delivered"}


def test_received_totals_are_logged_once_per_interval(live_engine: Engine) -> None:
    from structlog.testing import capture_logs

    factory = sessionmaker(bind=live_engine, expire_on_commit=False)
    with factory() as session:
        bot = create_whatsapp_bot(session)
        session.commit()
        app = repository.meta_apps(session)[-1]
    batcher = IntakeBatcher(factory, Directory(factory), log_every=3600)
    unknown = StatusUpdate("whatsapp", bot.phone_number_id, "wamid.NONE", "read", datetime.now(UTC))
    with capture_logs() as logs:
        for _ in range(3):
            batcher.apply(service.Delivery("whatsapp", app, [unknown]))
        batcher.flush_log()
        batcher.flush_log()  # nothing new: no line
    lines = [e for e in logs if e["event"] == "webhooks.received"]
    # The first batch at once, the other two together when flushed.
    assert [(e["deliveries"], e["statuses"]) for e in lines] == [(1, 1), (2, 2)]


def test_a_failed_batch_fails_every_request_in_it() -> None:
    unbound = sessionmaker()
    batcher = IntakeBatcher(unbound, Directory(unbound), max_requests=10, max_wait=0.2)
    status = StatusUpdate("whatsapp", "1", "wamid.X", "read", datetime.now(UTC))
    app = repository.AppSecrets(1, 1, "secret", "token")
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            batcher.apply(service.Delivery("whatsapp", app, [status]))
        except Exception as exc:  # noqa: BLE001  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3
    assert batcher.stats().batches == 0
    assert batcher.stats().retried == 1  # applied again delivery by delivery; each failed


def _seed_conversation(session: Session, bot: WhatsAppBot) -> int:
    account = repository.channel_account(session, "whatsapp", bot.phone_number_id)
    assert account is not None
    contact = repository.contact_id(
        session,
        workspace_id=account.workspace_id,
        channel="whatsapp",
        external_id="15550200099",
        name=None,
    )
    conversation = repository.conversation_id(session, account=account, contact=contact)
    session.commit()
    return conversation
