"""``maintenance.fetch_media`` against real Postgres and a local Graph/CDN stand-in reached only
through the development loopback flag of :mod:`webhooks.media` (the sandbox Graph origin).

Messages are stored by posting a signed WhatsApp image webhook through the app, as Meta would.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.config import reset_settings
from core.models import Contact, Conversation, MediaItem, Message, OutboxJob
from tests.support.factories import WhatsAppBot
from webhooks import media_tasks, simulator

PAYLOADS = Path(__file__).parents[1] / "payloads" / "whatsapp"
MEDIA_ID = "1183456789012345"
BODY = b"\xff\xd8\xff\xe0" + b"PLAINTEXT-MARKER-" * 64
Route = Callable[[BaseHTTPRequestHandler], None]


class StandIn:
    """A local HTTP server answering GETs from ``routes`` and recording each request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  # http.server's naming
                outer.requests.append((self.path, dict(self.headers.items())))
                route = outer.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(body: bytes, *, status: int = 200, ctype: str = "image/jpeg") -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def graph_answer(url: str, body: bytes) -> Route:
    meta = {
        "url": url,
        "mime_type": "image/jpeg",
        "sha256": hashlib.sha256(body).hexdigest(),
        "file_size": len(body),
        "id": MEDIA_ID,
        "messaging_product": "whatsapp",
    }
    return reply(json.dumps(meta).encode(), ctype="application/json")


@pytest.fixture
def graph(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    """The Graph API and its CDN on one loopback origin, allowed by the sandbox flag only."""
    server = StandIn()
    monkeypatch.setenv("PARLEY_GRAPH_API_URL", server.url("/graph"))
    monkeypatch.setenv("PARLEY_GRAPH_API_VERSION", "v23.0")
    monkeypatch.setenv("PARLEY_SANDBOX", "true")
    monkeypatch.setenv("PARLEY_MEDIA_SANDBOX_LOOPBACK", "true")
    monkeypatch.setenv("PARLEY_MEDIA_TIMEOUT", "3")
    reset_settings()
    yield server
    server.close()
    monkeypatch.undo()
    reset_settings()


def _deliver_image(client: TestClient, db: Session, bot: WhatsAppBot) -> Message:
    payload = json.loads((PAYLOADS / "image.json").read_text())
    value = payload["entry"][0]["changes"][0]["value"]
    value["metadata"]["phone_number_id"] = bot.phone_number_id
    value["messages"][0]["id"] = simulator.new_wamid()
    body, headers = simulator.signed(payload, bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200
    db.expire_all()
    message = db.scalars(
        select(Message).where(Message.provider_message_id == value["messages"][0]["id"])
    ).one()
    assert message.kind == "media"
    return message


def _run(db: Session, factory: sessionmaker[Session], message_id: int) -> tuple[int, str]:
    job = jobs.enqueue(db, media_tasks.TASK, message_id=message_id)
    db.commit()
    result = jobs.run_job(
        job.id, media_tasks.fetch_media, on_dead=media_tasks.give_up, factory=factory
    )
    return job.id, result


def _rows(db: Session, message_id: int) -> list[MediaItem]:
    db.expire_all()
    return list(
        db.scalars(
            select(MediaItem).where(MediaItem.message_id == message_id).order_by(MediaItem.idx)
        )
    )


def _job(db: Session, job_id: int) -> OutboxJob:
    db.expire_all()
    return db.get_one(OutboxJob, job_id)


def test_whatsapp_media_is_stored_encrypted_and_a_rerun_changes_nothing(
    client: TestClient,
    db: Session,
    factory: sessionmaker[Session],
    wa_bot: WhatsAppBot,
    graph: StandIn,
) -> None:
    graph.routes[f"/graph/v23.0/{MEDIA_ID}"] = graph_answer(graph.url("/cdn/m?hash=1"), BODY)
    graph.routes["/cdn/m"] = reply(BODY, ctype="application/octet-stream")
    message = _deliver_image(client, db, wa_bot)

    job_id, result = _run(db, factory, message.id)

    assert result == "done"
    assert _job(db, job_id).state == "done"
    [row] = _rows(db, message.id)
    assert (row.state, row.kind, row.mime_type, row.error) == (
        "stored",
        "image",
        "image/jpeg",
        None,
    )
    assert row.content == BODY
    assert (row.size, row.sha256) == (len(BODY), hashlib.sha256(BODY).hexdigest())
    assert row.workspace_id == message.workspace_id
    raw = db.execute(text("SELECT content FROM media WHERE id = :id"), {"id": row.id}).scalar_one()
    assert b"PLAINTEXT-MARKER" not in bytes(raw)
    assert b"PLAINTEXT-MARKER" not in json.dumps(row.error).encode()
    assert [path for path, _ in graph.requests] == [f"/graph/v23.0/{MEDIA_ID}", "/cdn/m?hash=1"]
    assert all(h["Authorization"] == f"Bearer {wa_bot.access_token}" for _, h in graph.requests)

    # The same job again is skipped; a second job for the message fetches nothing.
    assert jobs.run_job(job_id, media_tasks.fetch_media, factory=factory) == "skipped"
    again_id, again = _run(db, factory, message.id)
    assert again == "done"
    assert _job(db, again_id).state == "done"
    assert len(graph.requests) == 2
    [same] = _rows(db, message.id)
    assert (same.id, same.state, same.content, same.fetched_at) == (
        row.id,
        "stored",
        BODY,
        row.fetched_at,
    )


def test_a_refused_url_is_recorded_and_never_retried(
    client: TestClient,
    db: Session,
    factory: sessionmaker[Session],
    wa_bot: WhatsAppBot,
    graph: StandIn,
) -> None:
    # The Graph API points at a host off the allow-list (and private): refused before connecting.
    graph.routes[f"/graph/v23.0/{MEDIA_ID}"] = graph_answer("http://10.11.12.13/cdn", BODY)
    message = _deliver_image(client, db, wa_bot)

    job_id, result = _run(db, factory, message.id)

    assert result == "done"
    [row] = _rows(db, message.id)
    assert row.state == "refused"
    assert row.content is None
    assert row.error is not None and "host not allowed" in row.error
    assert _job(db, job_id).state == "done"
    assert _run(db, factory, message.id)[1] == "done"
    assert len(graph.requests) == 1


def test_over_the_size_cap_is_refused(
    client: TestClient,
    db: Session,
    factory: sessionmaker[Session],
    wa_bot: WhatsAppBot,
    graph: StandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PARLEY_MEDIA_MAX_BYTES", "100")
    reset_settings()
    graph.routes[f"/graph/v23.0/{MEDIA_ID}"] = graph_answer(graph.url("/cdn/m"), BODY)
    graph.routes["/cdn/m"] = reply(BODY)
    message = _deliver_image(client, db, wa_bot)

    job_id, result = _run(db, factory, message.id)

    assert result == "done"
    [row] = _rows(db, message.id)
    assert (row.state, row.content) == ("refused", None)
    assert row.error == "too large (limit 100 bytes)"
    # The stated file_size was enough: the CDN was never asked.
    assert [path for path, _ in graph.requests] == [f"/graph/v23.0/{MEDIA_ID}"]


def test_a_retryable_failure_backs_off_and_a_later_attempt_stores(
    client: TestClient,
    db: Session,
    factory: sessionmaker[Session],
    wa_bot: WhatsAppBot,
    graph: StandIn,
) -> None:
    graph.routes[f"/graph/v23.0/{MEDIA_ID}"] = reply(b'{"error":{}}', status=503)
    message = _deliver_image(client, db, wa_bot)

    job_id, result = _run(db, factory, message.id)

    assert result == "failed"
    job = _job(db, job_id)
    assert (job.state, job.attempts) == ("pending", 1)
    assert job.last_error == "MediaUnavailable: HTTP 503"
    [row] = _rows(db, message.id)
    assert (row.state, row.content) == ("pending", None)

    graph.routes[f"/graph/v23.0/{MEDIA_ID}"] = graph_answer(graph.url("/cdn/m"), BODY)
    graph.routes["/cdn/m"] = reply(BODY)
    assert jobs.run_job(job_id, media_tasks.fetch_media, factory=factory) == "done"
    [row] = _rows(db, message.id)
    assert (row.state, row.content) == ("stored", BODY)
    assert _job(db, job_id).attempts == 2


def test_the_last_attempt_marks_pending_media_failed(
    client: TestClient,
    db: Session,
    factory: sessionmaker[Session],
    wa_bot: WhatsAppBot,
    graph: StandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PARLEY_JOB_MAX_ATTEMPTS", "1")
    reset_settings()
    graph.routes[f"/graph/v23.0/{MEDIA_ID}"] = reply(b"{}", status=500)
    message = _deliver_image(client, db, wa_bot)

    job_id, result = _run(db, factory, message.id)
    assert result == "failed"
    assert (
        jobs.run_job(job_id, media_tasks.fetch_media, on_dead=media_tasks.give_up, factory=factory)
        == "dead"
    )
    [row] = _rows(db, message.id)
    assert (row.state, row.error) == ("failed", "gave up after the last attempt")


def test_attachment_urls_are_fetched_without_a_token_and_links_are_not(
    client: TestClient,
    db: Session,
    factory: sessionmaker[Session],
    wa_bot: WhatsAppBot,
    graph: StandIn,
) -> None:
    graph.routes["/cdn/photo.png"] = reply(BODY, ctype="image/png")
    stored = _deliver_image(client, db, wa_bot)
    content = {
        "type": "InboundMedia",
        "media": [
            {"kind": "image", "url": graph.url("/cdn/photo.png?oh=1")},
            {"kind": "fallback", "url": graph.url("/elsewhere")},
            {"kind": "audio", "url": graph.url("/cdn/gone.mp4")},
        ],
    }
    message = Message(
        workspace_id=stored.workspace_id,
        conversation_id=stored.conversation_id,
        direction="in",
        channel="messenger",
        kind="media",
        provider_message_id="m_" + simulator.new_wamid(),
        body="[image, fallback, audio]",
        content=json.dumps(content),
        status="received",
    )
    db.add(message)
    db.commit()

    job_id, result = _run(db, factory, message.id)

    assert result == "done"
    rows = _rows(db, message.id)
    assert [(r.idx, r.kind, r.state) for r in rows] == [
        (0, "image", "stored"),
        (1, "fallback", "refused"),
        (2, "audio", "failed"),
    ]
    assert (rows[0].content, rows[0].mime_type) == (BODY, "image/png")
    assert rows[1].error == "not a media file"
    assert rows[2].error == "MediaUnavailable: HTTP 404"
    assert [path for path, _ in graph.requests] == ["/cdn/photo.png?oh=1", "/cdn/gone.mp4"]
    assert all("Authorization" not in h for _, h in graph.requests)


def test_a_message_without_media_completes_without_rows(
    client: TestClient, db: Session, factory: sessionmaker[Session], wa_bot: WhatsAppBot
) -> None:
    payload = simulator.whatsapp_text(
        phone_number_id=wa_bot.phone_number_id, wa_id="15551230000", text="hi"
    )
    body, headers = simulator.signed(payload, wa_bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200
    db.expire_all()
    message = db.scalars(select(Message).order_by(Message.id.desc()).limit(1)).one()

    job_id, result = _run(db, factory, message.id)

    assert result == "done"
    assert _rows(db, message.id) == []
    assert _run(db, factory, 10**12)[1] == "done"


def test_a_deleted_message_loses_its_downloaded_media(
    client: TestClient,
    db: Session,
    factory: sessionmaker[Session],
    wa_bot: WhatsAppBot,
    graph: StandIn,
) -> None:
    graph.routes[f"/graph/v23.0/{MEDIA_ID}"] = graph_answer(graph.url("/cdn/m?hash=1"), BODY)
    graph.routes["/cdn/m"] = reply(BODY, ctype="application/octet-stream")
    message = _deliver_image(client, db, wa_bot)
    assert _run(db, factory, message.id)[1] == "done"
    assert [r.state for r in _rows(db, message.id)] == ["stored"]
    contact = db.get_one(Contact, db.get_one(Conversation, message.conversation_id).contact_id)
    revoke = simulator.whatsapp_revoke(
        phone_number_id=wa_bot.phone_number_id,
        wa_id=contact.external_id,
        original_message_id=str(message.provider_message_id),
    )
    body, headers = simulator.signed(revoke, wa_bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200
    assert _rows(db, message.id) == []
    db.expire_all()
    assert db.get_one(Message, message.id).kind == "deleted"
