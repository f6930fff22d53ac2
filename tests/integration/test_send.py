"""The send lane in-process on the test's transaction, against the sandbox Graph API and, where a
specific Meta answer is needed, a scripted Graph API speaking Meta's wire format."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.config import Settings, get_settings, reset_settings
from core.models import (
    ChannelAccount,
    Conversation,
    Message,
    OutboundChunk,
    OutboxJob,
    Outcome,
    utcnow,
)
from parley.app import create_app
from tests.support.factories import WhatsAppBot, create_whatsapp_bot
from tests.support.servers import ThreadServer
from webhooks import repository, sandbox, simulator
from webhooks import tasks as send_tasks
from webhooks.ratelimit import Limits, connect

Reply = tuple[int, dict[str, Any] | None, dict[str, str]]


def ok(wamid: str | None = None) -> Reply:
    wamid = wamid or "wamid.SCRIPTED" + secrets.token_hex(8)
    return 200, {"messaging_product": "whatsapp", "messages": [{"id": wamid}]}, {}


def graph_error(status: int, code: int, **headers: str) -> Reply:
    return status, {"error": {"message": "x", "type": "OAuthException", "code": code}}, headers


class ScriptedGraph:
    """A Graph API answering each send with ``script(account, body)``; keeps every request."""

    def __init__(self, script: Callable[[str, dict[str, Any]], Reply]) -> None:
        self.script = script
        self.requests: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                account = self.path.strip("/").split("/")[1]
                outer.requests.append((account, body))
                status, payload, headers = outer.script(account, body)
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self) -> list[str]:
        return [body["text"]["body"] for _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Settings]]:
    """Set PARLEY_* settings for this test (the send lane reloads them)."""

    def apply(**values: Any) -> Settings:
        for key, value in values.items():
            monkeypatch.setenv(f"PARLEY_{key.upper()}", str(value))
        reset_settings()
        return get_settings()

    yield apply
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def graph() -> Iterator[Callable[[Callable[[str, dict[str, Any]], Reply]], ScriptedGraph]]:
    servers: list[ScriptedGraph] = []

    def start(script: Callable[[str, dict[str, Any]], Reply]) -> ScriptedGraph:
        servers.append(ScriptedGraph(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def faulty_sandbox(
    services: Settings,
) -> Iterator[Callable[..., str]]:
    """A sandbox Graph API with the given fault settings (no database: no status webhooks)."""
    servers: list[ThreadServer] = []

    def start(**values: Any) -> str:
        settings = services.model_copy(update=values)
        servers.append(ThreadServer(create_app(settings, sessionmaker())))
        return f"{servers[-1].url}/sandbox/graph"

    yield start
    for server in servers:
        server.close()


def inbound(client: TestClient, bot: WhatsAppBot, db: Session, wa_id: str) -> tuple[int, int]:
    """Deliver one user message; (conversation id, inbound message id)."""
    payload = simulator.whatsapp_text(phone_number_id=bot.phone_number_id, wa_id=wa_id, text="hi")
    body, headers = simulator.signed(payload, bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200
    db.expire_all()
    row = db.execute(
        select(Message.conversation_id, Message.id)
        .where(Message.direction == "in")
        .order_by(Message.id.desc())
        .limit(1)
    ).one()
    return row.conversation_id, row.id


def store_reply(
    db: Session,
    conversation_id: int,
    text: str,
    *,
    inbound_id: int | None = None,
    kind: str = "text",
) -> tuple[int, int]:
    """What the pipeline does: a pending outbound message (and its outcome), then the job."""
    conversation = db.get(Conversation, conversation_id)
    assert conversation is not None
    message = Message(
        workspace_id=conversation.workspace_id,
        conversation_id=conversation_id,
        direction="out",
        channel="whatsapp",
        kind=kind,
        body=text,
        body_redacted=text,
        status="pending",
        reply_to_id=inbound_id,
        attempts=0,
    )
    db.add(message)
    db.flush()
    if inbound_id is not None:
        db.add(
            Outcome(
                inbound_id=inbound_id,
                conversation_id=conversation_id,
                kind="replied",
                reply_id=message.id,
            )
        )
    job = jobs.enqueue(db, "webhooks.send", message_id=message.id)
    db.commit()
    return message.id, job.id


def chunks_of(db: Session, message_id: int) -> list[OutboundChunk]:
    db.expire_all()
    return list(
        db.execute(
            select(OutboundChunk)
            .where(OutboundChunk.message_id == message_id)
            .order_by(OutboundChunk.idx)
        ).scalars()
    )


def status_of(db: Session, message_id: int) -> str:
    db.expire_all()
    message = db.get(Message, message_id)
    assert message is not None
    return message.status


# --- chunks and order -------------------------------------------------------------------------


def test_a_long_reply_goes_out_as_ordered_chunks_of_one_message(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph_sandbox: str,
    configure: Callable[..., Settings],
) -> None:
    configure(graph_api_url=graph_sandbox.removesuffix("/graph") + "/graph")
    conversation, inbound_id = inbound(client, wa_bot, db, "15550100001")
    text = " ".join(f"part{i}" for i in range(1300))  # > 10,000 characters
    message_id, job_id = store_reply(db, conversation, text, inbound_id=inbound_id)
    before = len(sandbox.store.since(to="15550100001", after=0))
    assert send_tasks.send(job_id) == "done"
    chunks = chunks_of(db, message_id)
    assert [c.idx for c in chunks] == [0, 1, 2]
    assert {c.total for c in chunks} == {3}
    assert [c.idempotency_key for c in chunks] == [f"{message_id}:{i}" for i in range(3)]
    assert all(c.state == "sent" and c.attempts == 1 and not c.resent for c in chunks)
    assert all(c.provider_message_id and c.sent_at for c in chunks)
    got = sandbox.store.since(to="15550100001", after=0)[before:]
    assert [m.text for m in got] == [c.body for c in chunks]
    assert " ".join(m.text for m in got) == text
    assert [m.biz_opaque_callback_data for m in got] == [c.idempotency_key for c in chunks]
    db.expire_all()
    message = db.get(Message, message_id)
    assert message is not None and message.status == "sent" and message.sent_at is not None
    assert message.provider_message_id == chunks[0].provider_message_id
    # A redelivered task and a second chunk insert change nothing.
    assert send_tasks.send(job_id) == "skipped"
    outbound = repository.outbound(db, message_id)
    assert outbound is not None
    repository.create_chunks(db, outbound, ["other"])
    assert len(chunks_of(db, message_id)) == 3
    assert len(sandbox.store.since(to="15550100001", after=0)[before:]) == 3


def test_replies_of_a_conversation_go_out_in_message_order(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph: Callable[..., ScriptedGraph],
    configure: Callable[..., Settings],
) -> None:
    meta = graph(lambda account, body: ok())
    configure(graph_api_url=meta.url, send_order_delay=0.1)
    conversation, _ = inbound(client, wa_bot, db, "15550100002")
    first, first_job = store_reply(db, conversation, "first")
    second, second_job = store_reply(db, conversation, "second")
    # The later message's job runs first: it waits, even though the first has no chunks yet.
    assert send_tasks.send(second_job) == "deferred"
    assert meta.requests == []
    deferred = db.get(OutboxJob, second_job)
    assert deferred is not None and deferred.state == "pending"
    assert send_tasks.send(first_job) == "done"
    assert send_tasks.send(second_job) == "done"
    assert meta.texts() == ["first", "second"]
    assert status_of(db, first) == status_of(db, second) == "sent"


def test_a_chunk_in_flight_elsewhere_is_not_sent_again(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph: Callable[..., ScriptedGraph],
    configure: Callable[..., Settings],
) -> None:
    meta = graph(lambda account, body: ok())
    configure(graph_api_url=meta.url)
    conversation, _ = inbound(client, wa_bot, db, "15550100003")
    message_id, job_id = store_reply(db, conversation, "hello")
    outbound = repository.outbound(db, message_id)
    assert outbound is not None
    repository.create_chunks(db, outbound, ["hello"])
    (chunk,) = chunks_of(db, message_id)
    # Another run claimed it a moment ago: this run waits instead of sending.
    assert repository.claim_chunk(db, chunk.id, now=utcnow()) == 1
    assert repository.claim_chunk(db, chunk.id, now=utcnow()) is None
    db.commit()
    assert send_tasks.send(job_id) == "deferred"
    assert meta.requests == []
    # That run finishes; its duplicate is a no-op.
    assert repository.mark_sent(db, chunk.id, provider_message_id="wamid.X", now=utcnow())
    assert not repository.mark_sent(db, chunk.id, provider_message_id="wamid.Y", now=utcnow())
    db.commit()
    assert send_tasks.send(job_id) == "done"
    assert meta.requests == []
    assert chunks_of(db, message_id)[0].provider_message_id == "wamid.X"


def test_a_send_whose_worker_died_is_treated_as_ambiguous(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph: Callable[..., ScriptedGraph],
    configure: Callable[..., Settings],
) -> None:
    meta = graph(lambda account, body: ok())
    configure(graph_api_url=meta.url, graph_timeout=1, send_unknown_grace=30)
    conversation, _ = inbound(client, wa_bot, db, "15550100004")
    message_id, job_id = store_reply(db, conversation, "hello")
    outbound = repository.outbound(db, message_id)
    assert outbound is not None
    repository.create_chunks(db, outbound, ["hello"])
    (chunk,) = chunks_of(db, message_id)
    long_ago = utcnow() - timedelta(seconds=20)
    repository.claim_chunk(db, chunk.id, now=long_ago)
    db.commit()
    assert send_tasks.send(job_id) == "deferred"
    assert meta.requests == []  # not resent: it may have reached Meta
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "unknown" and chunk.last_error == "send interrupted"


# --- errors -----------------------------------------------------------------------------------


def test_429_is_retried_no_sooner_than_retry_after_and_with_jitter(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    faulty_sandbox: Callable[..., str],
    graph_sandbox: str,
    configure: Callable[..., Settings],
) -> None:
    configure(graph_api_url=faulty_sandbox(sandbox_faults="429=1,retry_after=2"))
    conversation, _ = inbound(client, wa_bot, db, "15550100005")
    message_id, job_id = store_reply(db, conversation, "hello")
    before = utcnow()
    assert send_tasks.send(job_id) == "deferred"
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "pending" and chunk.attempts == 1
    assert chunk.last_error == "graph 429 code 130429 retry"
    assert status_of(db, message_id) == "sending"
    job = db.get(OutboxJob, job_id)
    assert job is not None and job.attempts == 0  # a deferral does not spend a job attempt
    wait = (job.available_at - before).total_seconds()
    assert 2.0 <= wait <= 2.0 + get_settings().send_backoff_base + 1.0
    configure(graph_api_url=graph_sandbox)
    assert send_tasks.send(job_id) == "done"
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "sent" and chunk.attempts == 2


def test_5xx_is_retried_until_the_attempts_run_out(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    faulty_sandbox: Callable[..., str],
    configure: Callable[..., Settings],
) -> None:
    configure(
        graph_api_url=faulty_sandbox(sandbox_faults="500=1"),
        send_max_attempts=3,
        send_breaker_failures=100,
    )
    conversation, _ = inbound(client, wa_bot, db, "15550100006")
    message_id, job_id = store_reply(db, conversation, "first part")
    assert [send_tasks.send(job_id) for _ in range(3)] == ["deferred", "deferred", "done"]
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "dead" and chunk.attempts == 3
    assert chunk.last_error == "graph 500 code 131000 retry (attempts exhausted)"
    assert status_of(db, message_id) == "dead"


def test_a_never_retry_error_fails_the_message_at_once(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph: Callable[..., ScriptedGraph],
    configure: Callable[..., Settings],
) -> None:
    meta = graph(lambda account, body: graph_error(400, 131026))
    configure(graph_api_url=meta.url)
    conversation, _ = inbound(client, wa_bot, db, "15550100007")
    message_id, job_id = store_reply(db, conversation, "x " * 3000, kind="text")
    assert send_tasks.send(job_id) == "done"
    assert len(meta.requests) == 1  # the second chunk is not tried after the first failed
    assert [c.state for c in chunks_of(db, message_id)] == ["failed", "failed"]
    assert status_of(db, message_id) == "failed"
    assert send_tasks.send(job_id) == "skipped"


def test_refused_credentials_pause_the_account_and_probe_once_per_interval(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph: Callable[..., ScriptedGraph],
    configure: Callable[..., Settings],
) -> None:
    answers = [graph_error(401, 190)] * 2 + [ok()]
    meta = graph(lambda account, body: answers.pop(0))
    configure(graph_api_url=meta.url, send_paused_probe_interval=60)
    conversation, _ = inbound(client, wa_bot, db, "15550100008")
    message_id, job_id = store_reply(db, conversation, "hello")
    account_id = db.execute(
        select(ChannelAccount.id).where(ChannelAccount.external_id == wa_bot.phone_number_id)
    ).scalar_one()
    assert send_tasks.send(job_id) == "deferred"
    db.expire_all()
    assert db.get(ChannelAccount, account_id).status == "paused"  # type: ignore[union-attr]
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "pending" and chunk.attempts == 0  # waiting, not failing
    # The next run is the minute's probe; the one after waits without calling Meta.
    assert send_tasks.send(job_id) == "deferred"
    assert send_tasks.send(job_id) == "deferred"
    assert len(meta.requests) == 2
    db.expire_all()
    assert db.get(ChannelAccount, account_id).status == "paused"  # type: ignore[union-attr]
    # A minute later the probe goes through and the account is active again.
    limits = Limits(connect(get_settings().require_redis_url()), get_settings().redis_prefix)
    limits.client.delete(f"{limits.prefix}probe:{account_id}")
    assert send_tasks.send(job_id) == "done"
    db.expire_all()
    assert db.get(ChannelAccount, account_id).status == "active"  # type: ignore[union-attr]
    assert status_of(db, message_id) == "sent"


# --- ambiguous sends --------------------------------------------------------------------------


def test_a_stalled_send_is_not_resent_and_a_status_webhook_settles_it(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    faulty_sandbox: Callable[..., str],
    configure: Callable[..., Settings],
) -> None:
    stalling = faulty_sandbox(sandbox_faults="stall=1", sandbox_stall_seconds=3)
    configure(graph_api_url=stalling, graph_timeout=0.5, send_unknown_grace=60)
    conversation, _ = inbound(client, wa_bot, db, "15550100009")
    message_id, job_id = store_reply(db, conversation, "hello")
    assert send_tasks.send(job_id) == "deferred"
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "unknown" and chunk.last_error == "ambiguous ReadTimeout"
    (accepted,) = sandbox.store.since(to="15550100009", after=0)
    assert accepted.fault == "stall" and accepted.biz_opaque_callback_data == f"{message_id}:0"
    # Before the grace period the job waits and sends nothing.
    assert send_tasks.send(job_id) == "deferred"
    # Meta's status webhook names the send by its callback data: it was sent.
    for status in ("sent", "delivered"):
        payload = simulator.whatsapp_status(
            phone_number_id=wa_bot.phone_number_id,
            message_id=accepted.id,
            status=status,
            recipient_id="15550100009",
            callback_data=accepted.biz_opaque_callback_data,
        )
        body, headers = simulator.signed(payload, wa_bot.app_secret)
        assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "sent" and chunk.provider_message_id == accepted.id
    assert chunk.delivery == "delivered" and not chunk.resent
    assert send_tasks.send(job_id) == "done"
    assert status_of(db, message_id) == "sent"
    assert len(sandbox.store.since(to="15550100009", after=0)) == 1


def test_a_stalled_send_without_evidence_is_resent_once_after_the_grace_period(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    faulty_sandbox: Callable[..., str],
    graph_sandbox: str,
    configure: Callable[..., Settings],
) -> None:
    stalling = faulty_sandbox(sandbox_faults="stall=1", sandbox_stall_seconds=3)
    configure(graph_api_url=stalling, graph_timeout=0.5, send_unknown_grace=0.3)
    conversation, _ = inbound(client, wa_bot, db, "15550100010")
    message_id, job_id = store_reply(db, conversation, "hello")
    assert send_tasks.send(job_id) == "deferred"
    time.sleep(0.35)
    configure(graph_api_url=graph_sandbox, graph_timeout=5, send_unknown_grace=0.3)
    assert send_tasks.send(job_id) == "done"
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "sent" and chunk.resent and chunk.attempts == 2
    got = sandbox.store.since(to="15550100010", after=0)
    assert [m.text for m in got] == ["hello", "hello"]  # the one counted ambiguous_resent
    assert send_tasks.send(job_id) == "skipped"


def test_a_second_ambiguous_send_is_not_resent_again(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    faulty_sandbox: Callable[..., str],
    configure: Callable[..., Settings],
) -> None:
    stalling = faulty_sandbox(sandbox_faults="stall=1", sandbox_stall_seconds=2)
    configure(
        graph_api_url=stalling,
        graph_timeout=0.3,
        send_unknown_grace=0.2,
        send_breaker_failures=100,
    )
    conversation, _ = inbound(client, wa_bot, db, "15550100011")
    message_id, job_id = store_reply(db, conversation, "hello")
    assert send_tasks.send(job_id) == "deferred"
    time.sleep(0.25)
    assert send_tasks.send(job_id) == "deferred"  # the one resend, ambiguous again
    time.sleep(0.25)
    assert send_tasks.send(job_id) == "done"
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "dead" and chunk.resent
    assert chunk.last_error == "unconfirmed after resend"
    assert len(sandbox.store.since(to="15550100011", after=0)) == 2


# --- bulkheads --------------------------------------------------------------------------------


def test_an_open_breaker_holds_one_account_while_another_keeps_sending(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph: Callable[..., ScriptedGraph],
    configure: Callable[..., Settings],
) -> None:
    healthy = create_whatsapp_bot(db)
    db.commit()
    broken_number = wa_bot.phone_number_id
    meta = graph(lambda account, body: graph_error(503, 2) if account == broken_number else ok())
    configure(graph_api_url=meta.url, send_breaker_failures=2, send_breaker_cooldown=30)
    broken_conv, _ = inbound(client, wa_bot, db, "15550100012")
    healthy_conv, _ = inbound(client, healthy, db, "15550100013")
    broken_msg, broken_job = store_reply(db, broken_conv, "to the broken account")
    healthy_msg, healthy_job = store_reply(db, healthy_conv, "to the healthy account")
    assert send_tasks.send(broken_job) == "deferred"
    assert send_tasks.send(broken_job) == "deferred"  # second failure: the breaker opens
    calls = len(meta.requests)
    assert send_tasks.send(broken_job) == "deferred"
    assert len(meta.requests) == calls  # open: no call to Meta at all
    (chunk,) = chunks_of(db, broken_msg)
    assert chunk.state == "pending" and chunk.attempts == 2
    assert send_tasks.send(healthy_job) == "done"
    assert status_of(db, healthy_msg) == "sent"
    assert meta.requests[-1][0] == healthy.phone_number_id


def test_a_workspace_at_its_in_flight_cap_waits_and_others_do_not(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph: Callable[..., ScriptedGraph],
    configure: Callable[..., Settings],
) -> None:
    other = create_whatsapp_bot(db)
    db.commit()
    meta = graph(lambda account, body: ok())
    settings = configure(graph_api_url=meta.url, send_workspace_concurrency=1)
    busy_conv, _ = inbound(client, wa_bot, db, "15550100014")
    free_conv, _ = inbound(client, other, db, "15550100015")
    busy_msg, busy_job = store_reply(db, busy_conv, "waits")
    _, free_job = store_reply(db, free_conv, "goes")
    busy = db.get(Conversation, busy_conv)
    assert busy is not None
    limits = Limits(connect(settings.require_redis_url()), settings.redis_prefix)
    token, _ = limits.acquire_slot(busy.workspace_id, cap=1, ttl=60)  # a send in flight
    assert token is not None
    assert send_tasks.send(busy_job) == "deferred"
    assert send_tasks.send(free_job) == "done"
    assert meta.texts() == ["goes"]
    limits.release_slot(busy.workspace_id, token)
    assert send_tasks.send(busy_job) == "done"
    assert meta.texts() == ["goes", "waits"]
    assert status_of(db, busy_msg) == "sent"


# --- window -----------------------------------------------------------------------------------


def test_a_reply_after_the_window_closed_is_not_sent(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    graph: Callable[..., ScriptedGraph],
    configure: Callable[..., Settings],
) -> None:
    meta = graph(lambda account, body: ok())
    configure(graph_api_url=meta.url)
    conversation, inbound_id = inbound(client, wa_bot, db, "15550100016")
    message_id, job_id = store_reply(db, conversation, "too late", inbound_id=inbound_id)
    db.execute(
        update(Conversation)
        .where(Conversation.id == conversation)
        .values(last_inbound_at=utcnow() - timedelta(hours=24, minutes=1))
    )
    db.commit()
    assert send_tasks.send(job_id) == "done"
    assert meta.requests == []
    (chunk,) = chunks_of(db, message_id)
    assert chunk.state == "dead" and chunk.last_error == "window_expired"
    assert status_of(db, message_id) == "dead"
    outcome = db.get(Outcome, inbound_id)
    assert outcome is not None and outcome.kind == "window_expired"
    assert outcome.reply_id == message_id


def test_job_dead_lettered_by_crashes_ends_its_chunks(
    client: TestClient,
    db: Session,
    wa_bot: WhatsAppBot,
    configure: Callable[..., Settings],
) -> None:
    configure(job_max_attempts=1)
    conversation, _ = inbound(client, wa_bot, db, "15550100017")
    message_id, job_id = store_reply(db, conversation, "hello")
    outbound = repository.outbound(db, message_id)
    assert outbound is not None
    repository.create_chunks(db, outbound, ["hello"])
    # A worker died mid-run once: the attempt was counted before the work.
    db.execute(update(OutboxJob).where(OutboxJob.id == job_id).values(attempts=1))
    db.commit()
    assert send_tasks.send(job_id) == "dead"
    assert [c.state for c in chunks_of(db, message_id)] == ["dead"]
    assert status_of(db, message_id) == "dead"
