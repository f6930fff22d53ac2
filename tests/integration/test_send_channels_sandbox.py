"""Outbound for Messenger and Instagram (and WhatsApp's extras) in-process on the test's
transaction: exact request bodies at the sandbox Graph API, splitting at each channel's limit,
messaging types and the HUMAN_AGENT tag, echo webhooks, read/typing requests, account pauses."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from bots.schemas import BotsFile, BotSpec, ChannelSpec, MetaAppSpec
from bots.service import apply_bots
from core import jobs
from core.config import Settings, get_settings, reset_settings
from core.models import (
    ChannelAccount,
    Contact,
    Conversation,
    Message,
    OutboundChunk,
    Outcome,
    utcnow,
)
from parley.app import create_app
from tests.support.servers import ThreadServer
from webhooks import sandbox
from webhooks import tasks as send_tasks
from webhooks.channels import meta


@dataclass(frozen=True)
class Account:
    channel: str
    account_id: int
    external_id: str
    app_secret: str
    app_id: str


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Settings]]:
    def apply(**values: Any) -> Settings:
        for key, value in values.items():
            monkeypatch.setenv(f"PARLEY_{key.upper()}", str(value))
        reset_settings()
        return get_settings()

    yield apply
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def accounts(db: Session) -> dict[str, Account]:
    """One bot with a WhatsApp number, a Messenger page and an Instagram account."""
    workspace = f"ws-{secrets.token_hex(3)}"
    secret, app_id = secrets.token_hex(16), str(10**14 + secrets.randbelow(10**13))
    ids = {c: str(10**14 + secrets.randbelow(10**13)) for c in ("whatsapp", "messenger", "ig")}
    spec = BotsFile(
        workspace=workspace,
        meta_apps=[
            MetaAppSpec(name="app", app_id=app_id, app_secret=secret, verify_token="verify")
        ],
        bots=[
            BotSpec(
                name="bot",
                system_prompt="You help.",
                channels=[
                    ChannelSpec(
                        type="whatsapp",
                        app="app",
                        phone_number_id=ids["whatsapp"],
                        access_token="wa-token",
                    ),
                    ChannelSpec(
                        type="messenger", app="app", page_id=ids["messenger"], access_token="pt"
                    ),
                    ChannelSpec(
                        type="instagram",
                        app="app",
                        instagram_account_id=ids["ig"],
                        access_token="it",
                    ),
                ],
            )
        ],
    )
    apply_bots(db, spec)
    db.commit()
    out: dict[str, Account] = {}
    for channel, external in (
        ("whatsapp", ids["whatsapp"]),
        ("messenger", ids["messenger"]),
        ("instagram", ids["ig"]),
    ):
        account_id = db.execute(
            select(ChannelAccount.id).where(
                ChannelAccount.channel == channel, ChannelAccount.external_id == external
            )
        ).scalar_one()
        out[channel] = Account(channel, account_id, external, secret, app_id)
    return out


class Capture:
    """Receives the sandbox's webhooks (path, headers, raw body)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append((self.path, dict(self.headers), raw))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    server = Capture()
    yield server
    server.close()


@pytest.fixture
def graph(
    services: Settings,
    factory: sessionmaker[Session],
    capture: Capture,
    configure: Callable[..., Settings],
) -> Iterator[str]:
    """The sandbox Graph API on a real port, reading the test's rows, posting webhooks to
    ``capture``; the send lane is pointed at it."""
    settings = services.model_copy(
        update={"sandbox_webhook_url": capture.url + "/{channel}", "sandbox_webhook_delay": 0.01}
    )
    app = create_app(settings, factory)
    server = ThreadServer(app)
    url = f"{server.url}/sandbox/graph"
    configure(graph_api_url=url, send_order_delay=0.05)
    yield url
    sandbox_state: sandbox.SandboxState | None = getattr(app.state, "sandbox", None)
    if sandbox_state is not None:
        sandbox_state.webhooks.drain(5.0)
    server.close()


def conversation(
    db: Session, account: Account, *, user: str | None = None, ago: timedelta = timedelta(0)
) -> tuple[int, int, str]:
    """A contact who wrote ``ago``: (conversation id, inbound message id, contact's id)."""
    user = user or str(10**15 + secrets.randbelow(10**14))
    row = db.get(ChannelAccount, account.account_id)
    assert row is not None
    contact = Contact(workspace_id=row.workspace_id, channel=account.channel, external_id=user)
    db.add(contact)
    db.flush()
    at = utcnow() - ago
    conv = Conversation(
        workspace_id=row.workspace_id,
        bot_id=row.bot_id,
        channel_account_id=row.id,
        contact_id=contact.id,
        last_inbound_at=at,
    )
    db.add(conv)
    db.flush()
    inbound = Message(
        workspace_id=row.workspace_id,
        conversation_id=conv.id,
        direction="in",
        channel=account.channel,
        kind="text",
        provider_message_id=("wamid." if account.channel == "whatsapp" else "m_")
        + secrets.token_hex(8),
        provider_ts=at,
        body="hi",
        body_redacted="hi",
        status="received",
        attempts=0,
    )
    db.add(inbound)
    db.commit()
    return conv.id, inbound.id, user


def outbound(
    db: Session,
    conversation_id: int,
    channel: str,
    text: str,
    *,
    kind: str = "text",
    reply_to: int | None = None,
) -> tuple[int, int]:
    conv = db.get(Conversation, conversation_id)
    assert conv is not None
    message = Message(
        workspace_id=conv.workspace_id,
        conversation_id=conversation_id,
        direction="out",
        channel=channel,
        kind=kind,
        body=text,
        body_redacted=text,
        status="pending",
        reply_to_id=reply_to,
        attempts=0,
    )
    db.add(message)
    db.flush()
    if reply_to is not None:
        db.add(
            Outcome(
                inbound_id=reply_to,
                conversation_id=conversation_id,
                kind="replied",
                reply_id=message.id,
            )
        )
    job = jobs.enqueue(db, "webhooks.send", message_id=message.id)
    db.commit()
    return message.id, job.id


def chunks(db: Session, message_id: int) -> list[OutboundChunk]:
    db.expire_all()
    return list(
        db.execute(
            select(OutboundChunk)
            .where(OutboundChunk.message_id == message_id)
            .order_by(OutboundChunk.idx)
        ).scalars()
    )


def sent_to(user: str) -> list[sandbox.SentMessage]:
    return sandbox.store.since(to=user, after=0)


def echoes(capture: Capture, path: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in capture.posts if p[0] == path]
        if found:
            break
        time.sleep(0.02)
    return [
        {"headers": h, "raw": raw, "json": json.loads(raw)}
        for p, h, raw in capture.posts
        if p == path
    ]


# --- Messenger --------------------------------------------------------------------------------


def test_messenger_long_reply_exact_bodies_splitting_and_signed_echo(
    db: Session, accounts: dict[str, Account], graph: str, capture: Capture
) -> None:
    page = accounts["messenger"]
    conv, inbound_id, psid = conversation(db, page)
    text = " ".join(f"word{i}" for i in range(800))  # ~6,000 characters
    message_id, job_id = outbound(db, conv, "messenger", text, reply_to=inbound_id)
    assert send_tasks.send(job_id) == "done"
    rows = chunks(db, message_id)
    assert len(rows) == 4 and all(len(c.body) < 2000 for c in rows)
    assert " ".join(c.body for c in rows) == text
    got = sent_to(psid)
    assert [m.request for m in got] == [
        {
            "recipient": {"id": psid},
            "messaging_type": "RESPONSE",
            "message": {"text": c.body, "metadata": c.idempotency_key},
        }
        for c in rows
    ]
    assert {m.account for m in got} == {page.external_id}
    assert {m.channel for m in got} == {"messenger"}
    assert [c.provider_message_id for c in rows] == [m.id for m in got]
    assert all(c.state == "sent" for c in rows)
    # Each send is followed by a signed is_echo webhook carrying its metadata and app id.
    posts = echoes(capture, "/messenger")
    deadline = time.monotonic() + 5
    while len(posts) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
        posts = echoes(capture, "/messenger")
    assert len(posts) == 4
    for post in posts:
        assert (
            meta.verify_signature(
                post["raw"], post["headers"]["X-Hub-Signature-256"], [page.app_secret]
            )
            == 0
        )
    events = sorted(
        (p["json"]["entry"][0]["messaging"][0] for p in posts),
        key=lambda e: str(e["message"]["metadata"]),
    )
    assert [e["message"]["metadata"] for e in events] == [c.idempotency_key for c in rows]
    for event in events:
        assert event["sender"] == {"id": page.external_id}
        assert event["recipient"] == {"id": psid}
        assert event["message"]["is_echo"] is True
        assert event["message"]["app_id"] == int(page.app_id)
    assert {p["json"]["object"] for p in posts} == {"page"}


def test_messenger_notice_is_update_and_a_late_bot_reply_is_not_sent(
    db: Session, accounts: dict[str, Account], graph: str
) -> None:
    page = accounts["messenger"]
    conv, _, psid = conversation(db, page, ago=timedelta(hours=2))
    notice_id, notice_job = outbound(db, conv, "messenger", "We answer soon.", kind="notice")
    assert send_tasks.send(notice_job) == "done"
    (sent,) = sent_to(psid)
    assert sent.request == {
        "recipient": {"id": psid},
        "messaging_type": "UPDATE",
        "message": {"text": "We answer soon.", "metadata": f"{notice_id}:0"},
    }
    late_conv, late_in, late_user = conversation(db, page, ago=timedelta(hours=25))
    late_id, late_job = outbound(db, late_conv, "messenger", "too late", reply_to=late_in)
    assert send_tasks.send(late_job) == "done"
    assert sent_to(late_user) == []
    (chunk,) = chunks(db, late_id)
    assert chunk.state == "dead" and chunk.last_error == "window_expired"
    outcome = db.get(Outcome, late_in)
    assert outcome is not None and outcome.kind == "window_expired"


def test_a_human_message_after_24_hours_carries_human_agent_until_7_days(
    db: Session, accounts: dict[str, Account], graph: str
) -> None:
    for channel in ("messenger", "instagram"):
        account = accounts[channel]
        conv, _, user = conversation(db, account, ago=timedelta(days=3))
        _, job = outbound(db, conv, channel, "A person here.", kind="human")
        assert send_tasks.send(job) == "done"
        (sent,) = sent_to(user)
        assert sent.request is not None
        assert sent.request["messaging_type"] == "MESSAGE_TAG"
        assert sent.request["tag"] == "HUMAN_AGENT"
        old_conv, _, old_user = conversation(db, account, ago=timedelta(days=7, minutes=1))
        old_id, old_job = outbound(db, old_conv, channel, "Too late.", kind="human")
        assert send_tasks.send(old_job) == "done"
        assert sent_to(old_user) == []
        assert [c.last_error for c in chunks(db, old_id)] == ["window_expired"]


# --- Instagram --------------------------------------------------------------------------------


def test_instagram_splits_at_1000_utf8_bytes_with_exact_bodies_and_an_echo(
    db: Session, accounts: dict[str, Account], graph: str, capture: Capture
) -> None:
    ig = accounts["instagram"]
    conv, inbound_id, igsid = conversation(db, ig)
    text = " ".join(["caf\u00e9 \U0001f370 sch\u00f6n"] * 120)  # multibyte: > 1000 characters
    assert len(text) < 2000 < len(text.encode())
    message_id, job_id = outbound(db, conv, "instagram", text, reply_to=inbound_id)
    assert send_tasks.send(job_id) == "done"
    rows = chunks(db, message_id)
    assert len(rows) >= 2 and all(len(c.body.encode()) <= 1000 for c in rows)
    assert " ".join(c.body for c in rows) == text
    got = sent_to(igsid)
    assert [m.request for m in got] == [
        {"recipient": {"id": igsid}, "messaging_type": "RESPONSE", "message": {"text": c.body}}
        for c in rows
    ]
    assert {m.channel for m in got} == {"instagram"}
    assert all(c.state == "sent" and c.provider_message_id for c in rows)
    deadline = time.monotonic() + 5
    posts = echoes(capture, "/instagram")
    while len(posts) < len(rows) and time.monotonic() < deadline:
        time.sleep(0.02)
        posts = echoes(capture, "/instagram")
    assert len(posts) == len(rows)
    for post in posts:
        assert (
            meta.verify_signature(
                post["raw"], post["headers"]["X-Hub-Signature-256"], [ig.app_secret]
            )
            == 0
        )
        assert post["json"]["object"] == "instagram"
        message = post["json"]["entry"][0]["messaging"][0]["message"]
        assert message["is_echo"] is True
        assert "metadata" not in message and "app_id" not in message


def test_the_sandbox_refuses_what_meta_refuses(graph: str) -> None:
    url = f"{graph}/v23.0/me/messages"
    auth = {"Authorization": "Bearer x"}
    no_type = {"recipient": {"id": "1"}, "message": {"text": "hi"}}
    assert httpx.post(url, json=no_type, headers=auth).json()["error"]["code"] == 100
    untagged_tag = {
        "recipient": {"id": "1"},
        "messaging_type": "RESPONSE",
        "tag": "HUMAN_AGENT",
        "message": {"text": "hi"},
    }
    assert httpx.post(url, json=untagged_tag, headers=auth).status_code == 400
    too_long = {
        "recipient": {"id": "1"},
        "messaging_type": "RESPONSE",
        "message": {"text": "x" * 2000},
    }
    assert httpx.post(url, json=too_long, headers=auth).status_code == 400
    ok = {"recipient": {"id": "1"}, "messaging_type": "RESPONSE", "message": {"text": "x"}}
    assert httpx.post(url, json=ok).status_code == 401
    answer = httpx.post(url, params={"access_token": "page-token"}, json=ok)
    assert answer.status_code == 200 and answer.json()["recipient_id"] == "1"
    assert answer.json()["message_id"].startswith("m_")


# --- WhatsApp reply context -------------------------------------------------------------------


def test_whatsapp_reply_carries_context_on_its_first_chunk(
    db: Session, accounts: dict[str, Account], graph: str
) -> None:
    wa = accounts["whatsapp"]
    conv, inbound_id, wa_id = conversation(db, wa)
    wamid = db.get(Message, inbound_id).provider_message_id  # type: ignore[union-attr]
    message_id, job_id = outbound(db, conv, "whatsapp", "y " * 2500, reply_to=inbound_id)
    assert send_tasks.send(job_id) == "done"
    first, second = sent_to(wa_id)
    assert first.request is not None and second.request is not None
    assert first.request["context"] == {"message_id": wamid}
    assert "context" not in second.request
    assert first.request["biz_opaque_callback_data"] == f"{message_id}:0"


# --- read receipts and typing -----------------------------------------------------------------


def _typing_job(db: Session, inbound_id: int) -> int:
    job = jobs.enqueue(db, "webhooks.send_typing", message_id=inbound_id)
    db.commit()
    return job.id


def test_read_and_typing_requests_per_channel(
    db: Session, accounts: dict[str, Account], graph: str
) -> None:
    before = len(sandbox.store.actions)
    conv, inbound_id, _ = conversation(db, accounts["whatsapp"])
    wamid = db.get(Message, inbound_id).provider_message_id  # type: ignore[union-attr]
    assert send_tasks.send_typing(_typing_job(db, inbound_id)) == "done"
    _, page_in, psid = conversation(db, accounts["messenger"])
    assert send_tasks.send_typing(_typing_job(db, page_in)) == "done"
    _, ig_in, igsid = conversation(db, accounts["instagram"])
    assert send_tasks.send_typing(_typing_job(db, ig_in)) == "done"
    got = [(a.channel, a.request) for a in sandbox.store.actions[before:]]
    assert got == [
        (
            "whatsapp",
            {
                "messaging_product": "whatsapp",
                "status": "read",
                "message_id": wamid,
                "typing_indicator": {"type": "text"},
            },
        ),
        ("messenger", {"recipient": {"id": psid}, "sender_action": "mark_seen"}),
        ("messenger", {"recipient": {"id": psid}, "sender_action": "typing_on"}),
        ("instagram", {"recipient": {"id": igsid}, "sender_action": "mark_seen"}),
        ("instagram", {"recipient": {"id": igsid}, "sender_action": "typing_on"}),
    ]
    # An old message is only marked read; a second run of the job does nothing.
    db.execute(
        update(Message)
        .where(Message.id == page_in)
        .values(created_at=utcnow() - timedelta(minutes=5))
    )
    db.commit()
    mark = len(sandbox.store.actions)
    assert send_tasks.send_typing(_typing_job(db, page_in)) == "done"
    assert [a.request["sender_action"] for a in sandbox.store.actions[mark:]] == ["mark_seen"]


class Scripted:
    """A Graph API answering every request with one fixed error; counts requests."""

    def __init__(self, status: int, code: int) -> None:
        self.count = 0
        outer = self
        data = json.dumps({"error": {"message": "x", "type": "OAuthException", "code": code}})

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.count += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_typing_is_retried_once_then_given_up(
    db: Session, accounts: dict[str, Account], configure: Callable[..., Settings]
) -> None:
    failing = Scripted(500, 131000)
    try:
        configure(graph_api_url=failing.url, typing_retry_delay=0)
        _, inbound_id, _ = conversation(db, accounts["whatsapp"])
        assert send_tasks.send_typing(_typing_job(db, inbound_id)) == "done"
        assert failing.count == 2
    finally:
        failing.close()


def test_messenger_refused_token_pauses_the_page_and_551_fails_the_message(
    db: Session, accounts: dict[str, Account], configure: Callable[..., Settings]
) -> None:
    page = accounts["messenger"]
    refused = Scripted(400, 190)
    try:
        configure(graph_api_url=refused.url)
        conv, inbound_id, _ = conversation(db, page)
        message_id, job_id = outbound(db, conv, "messenger", "hello", reply_to=inbound_id)
        assert send_tasks.send(job_id) == "deferred"
        db.expire_all()
        assert db.get(ChannelAccount, page.account_id).status == "paused"  # type: ignore[union-attr]
        (chunk,) = chunks(db, message_id)
        assert chunk.state == "pending"
    finally:
        refused.close()
    gone = Scripted(400, 551)
    try:
        configure(graph_api_url=gone.url)
        ig = accounts["instagram"]
        conv, inbound_id, _ = conversation(db, ig)
        message_id, job_id = outbound(db, conv, "instagram", "hello", reply_to=inbound_id)
        assert send_tasks.send(job_id) == "done"
        (chunk,) = chunks(db, message_id)
        assert chunk.state == "failed" and chunk.last_error == "graph 400 code 551 never"
        assert gone.count == 1
    finally:
        gone.close()
