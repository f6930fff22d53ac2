"""The sandbox Graph API behaves like Meta: signed status webhooks after each accepted send,
fault modes, and the ambiguous send settled by those webhooks. Real API server, committed
database, the send lane in-process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.config import Settings, reset_settings
from core.db import use_sessionmaker
from core.models import Message, OutboundChunk
from parley.app import create_app
from tests.support import databases
from tests.support.factories import WhatsAppBot, create_whatsapp_bot
from tests.support.servers import ThreadServer
from webhooks import sandbox, simulator
from webhooks import tasks as send_tasks


@pytest.fixture(scope="module")
def live_engine(template_db: str) -> Iterator[Engine]:
    name = databases.create_database("parley_sandbox", template=template_db)
    engine = create_engine(databases.url_for(name), pool_size=4, max_overflow=30)
    yield engine
    engine.dispose()
    databases.drop_database(name)


@pytest.fixture
def live(live_engine: Engine) -> Iterator[sessionmaker[Session]]:
    factory = sessionmaker(bind=live_engine, expire_on_commit=False)
    with use_sessionmaker(factory):
        yield factory


class Platform:
    """The API (webhooks + sandbox) on a real port, and the send lane pointed at it."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.app = create_app(settings, factory)
        self.server = ThreadServer(self.app)
        self.url = self.server.url
        self.factory = factory

    def deliver(self, bot: WhatsAppBot, wa_id: str) -> int:
        payload = simulator.whatsapp_text(
            phone_number_id=bot.phone_number_id, wa_id=wa_id, text="hi"
        )
        body, headers = simulator.signed(payload, bot.app_secret)
        r = httpx.post(f"{self.url}/webhooks/whatsapp", content=body, headers=headers)
        assert r.status_code == 200
        with self.factory() as session:
            return session.execute(
                select(Message.conversation_id)
                .where(Message.direction == "in")
                .order_by(Message.id.desc())
                .limit(1)
            ).scalar_one()

    def reply(self, conversation_id: int, text: str) -> tuple[int, int]:
        with self.factory() as session:
            workspace_id = (
                session.execute(
                    select(Message.workspace_id).where(Message.conversation_id == conversation_id)
                )
                .scalars()
                .first()
            )
            assert workspace_id is not None
            message = Message(
                workspace_id=workspace_id,
                conversation_id=conversation_id,
                direction="out",
                channel="whatsapp",
                kind="text",
                body=text,
                status="pending",
                attempts=0,
            )
            session.add(message)
            session.flush()
            job = jobs.enqueue(session, "webhooks.send", message_id=message.id)
            session.commit()
            return message.id, job.id

    def chunk(self, message_id: int) -> OutboundChunk:
        with self.factory() as session:
            return session.execute(
                select(OutboundChunk).where(OutboundChunk.message_id == message_id)
            ).scalar_one()

    @property
    def sandbox(self) -> sandbox.SandboxState:
        state: sandbox.SandboxState = self.app.state.sandbox
        return state

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def platform(
    services: Settings, live: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Platform]]:
    started: list[Platform] = []

    def start(**values: Any) -> Platform:
        settings = services.model_copy(update={"sandbox_webhook_delay": 0.05, **values})
        p = Platform(settings, live)
        started.append(p)
        lane = {k: v for k, v in values.items() if not k.startswith("sandbox")}
        lane["graph_api_url"] = f"{p.url}/sandbox/graph"
        for key, value in lane.items():
            monkeypatch.setenv(f"PARLEY_{key.upper()}", str(value))
        reset_settings()
        return p

    yield start
    for p in started:
        p.close()
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def bot(live: sessionmaker[Session]) -> WhatsAppBot:
    with live() as session:
        created = create_whatsapp_bot(session)
        session.commit()
    return created


def test_each_accepted_send_is_followed_by_signed_sent_and_delivered_webhooks(
    platform: Callable[..., Platform], bot: WhatsAppBot
) -> None:
    p = platform()
    message_id, job_id = p.reply(p.deliver(bot, "15550300001"), "hello")
    assert send_tasks.send(job_id) == "done"
    assert p.sandbox.webhooks.drain(10)
    # Both webhooks passed the API's signature check (a 200) and were applied.
    assert (p.sandbox.webhooks.posted, p.sandbox.webhooks.failed) == (2, 0)
    chunk = p.chunk(message_id)
    assert (chunk.state, chunk.delivery) == ("sent", "delivered")
    # Every delivery (the message, then both statuses) went through the group commit.
    assert p.app.state.intake.batcher.stats().requests == 3
    (record,) = sandbox.store.since(to="15550300001", after=0)
    assert record.biz_opaque_callback_data == f"{message_id}:0"
    assert record.order == record.seq and record.fault is None
    listed = httpx.get(f"{p.url}/sandbox/sent", params={"to": "15550300001"}).json()
    assert listed["messages"][0]["biz_opaque_callback_data"] == f"{message_id}:0"


def test_a_stalled_send_is_settled_by_the_sandbox_webhook_without_a_resend(
    platform: Callable[..., Platform], bot: WhatsAppBot
) -> None:
    p = platform(
        sandbox_faults="stall=1",
        sandbox_stall_seconds=1.5,
        graph_timeout=0.4,
        send_unknown_grace=60,
    )
    message_id, job_id = p.reply(p.deliver(bot, "15550300002"), "hello")
    assert send_tasks.send(job_id) == "deferred"
    assert p.chunk(message_id).state in ("unknown", "sent")  # the webhook may already be in
    assert p.sandbox.webhooks.drain(10)
    chunk = p.chunk(message_id)
    assert chunk.state == "sent" and not chunk.resent and chunk.delivery == "delivered"
    assert send_tasks.send(job_id) == "done"
    assert len(sandbox.store.since(to="15550300002", after=0)) == 1


def test_dropped_webhooks_leave_the_delivery_unknown(
    platform: Callable[..., Platform], bot: WhatsAppBot
) -> None:
    p = platform(sandbox_faults="drop_webhooks=1")
    message_id, job_id = p.reply(p.deliver(bot, "15550300003"), "hello")
    assert send_tasks.send(job_id) == "done"
    assert p.sandbox.webhooks.drain(5)
    assert p.sandbox.webhooks.posted == 0
    chunk = p.chunk(message_id)
    assert chunk.state == "sent" and chunk.delivery is None


def test_fault_draws_repeat_with_a_seed(services: Settings) -> None:
    settings = services.model_copy(
        update={"sandbox_faults": "429=0.2,500=0.2,stall=0.1,drop_webhooks=0.3", "sandbox_seed": 7}
    )
    first = sandbox.SandboxState(settings, sessionmaker())
    second = sandbox.SandboxState(settings, sessionmaker())
    draws = [first.draw() for _ in range(200)]
    assert draws == [second.draw() for _ in range(200)]
    kinds = {fault for fault, _ in draws}
    assert kinds == {None, "429", "500", "stall"}
    assert 20 < sum(drop for _, drop in draws) < 100


def test_429_and_500_answers_look_like_meta(platform: Callable[..., Platform]) -> None:
    throttled = platform(sandbox_faults="429=1,retry_after=3")
    body = {
        "messaging_product": "whatsapp",
        "to": "15550300004",
        "type": "text",
        "text": {"body": "hi"},
    }
    r = httpx.post(
        f"{throttled.url}/sandbox/graph/v23.0/1/messages",
        json=body,
        headers={"Authorization": "Bearer token"},
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == 130429
    broken = platform(sandbox_faults="500=1")
    r = httpx.post(
        f"{broken.url}/sandbox/graph/v23.0/1/messages",
        json=body,
        headers={"Authorization": "Bearer token"},
    )
    assert r.status_code == 500 and r.json()["error"]["code"] == 131000
    assert sandbox.store.since(to="15550300004", after=0) == []


def test_concurrent_status_posts_are_group_committed(
    platform: Callable[..., Platform], bot: WhatsAppBot, live_engine: Engine
) -> None:
    p = platform(intake_batch_wait=0.2, sandbox_webhooks=False, send_pair_burst=50)
    conversation_id = p.deliver(bot, "15550300005")
    sent: list[tuple[int, str]] = []
    for i in range(12):
        message_id, job_id = p.reply(conversation_id, f"message {i}")
        assert send_tasks.send(job_id) == "done"
        chunk = p.chunk(message_id)
        assert chunk.provider_message_id is not None
        sent.append((message_id, chunk.provider_message_id))
    commits: list[int] = []

    def count(_: object) -> None:
        commits.append(1)

    # The API's writer commits on its own engine (see webhooks.endpoints._writer_factory).
    writer_engine = p.app.state.intake.batcher.factory.kw["bind"]
    engines = {live_engine, writer_engine}
    for engine in engines:
        event.listen(engine, "commit", count)
    barrier = threading.Barrier(len(sent))
    codes: list[int] = []

    def post(wamid: str) -> None:
        payload = simulator.whatsapp_status(
            phone_number_id=bot.phone_number_id, message_id=wamid, status="read", recipient_id="1"
        )
        body, headers = simulator.signed(payload, bot.app_secret)
        barrier.wait()
        codes.append(
            httpx.post(f"{p.url}/webhooks/whatsapp", content=body, headers=headers).status_code
        )

    threads = [threading.Thread(target=post, args=(wamid,)) for _, wamid in sent]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for engine in engines:
        event.remove(engine, "commit", count)
    assert codes == [200] * len(sent)
    stats = p.app.state.intake.batcher.stats()
    # The first delivery (the user's message) plus the statuses; the statuses shared commits.
    assert stats.requests == 1 + len(sent) and stats.batches < len(sent)
    # Every acknowledged status is durable.
    with p.factory() as session:
        ids = [m for m, _ in sent]
        got = session.execute(
            select(OutboundChunk.delivery).where(OutboundChunk.message_id.in_(ids))
        ).scalars()
        assert set(got) == {"read"}
    # The statuses' batches committed (the apps may be re-read once); far fewer than requests.
    assert stats.batches - 1 <= len(commits) < len(sent)
