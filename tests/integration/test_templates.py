"""WhatsApp window templates: declared in the bot YAML, queued by the pipeline when the 24-hour
window has closed, sent by the send lane only while their status is APPROVED (template status
webhooks through the real route), with the exact request body at the sandbox Graph API."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from bots import pipeline
from bots.config import parse_bots
from bots.policy import Policy
from bots.schemas import (
    BotsFile,
    BotSpec,
    ChannelSpec,
    GenerationSpec,
    MetaAppSpec,
    TemplateSpec,
)
from bots.service import apply_bots
from core.config import Settings, get_settings, reset_settings
from core.errors import ConfigError
from core.models import (
    Bot,
    ChannelAccount,
    Message,
    Notice,
    OutboundChunk,
    OutboxJob,
    Outcome,
    Template,
)
from webhooks import sandbox, simulator
from webhooks import tasks as send_tasks

WABA = "200000000000077"
NAME = "order_update"
LANGUAGE = "en_US"
PARAMETERS = ["Acme Bakery", "Friday 9:00"]


@dataclass(frozen=True)
class TemplateBot:
    bot_id: int
    phone_number_id: str
    app_secret: str
    access_token: str


def make_bot(db: Session, template: TemplateSpec | None) -> TemplateBot:
    phone = str(100000000000000 + secrets.randbelow(10**12))
    secret, token = secrets.token_hex(16), secrets.token_hex(12)
    spec = BotsFile(
        workspace=f"ws-{secrets.token_hex(3)}",
        meta_apps=[MetaAppSpec(name="app", app_secret=secret, verify_token="verify")],
        bots=[
            BotSpec(
                name="bot",
                system_prompt="You answer questions about a bakery.",
                generation=GenerationSpec(temperature=0.0, max_tokens=16, seed=7),
                policy=Policy(burst_window_seconds=0),
                window_template=template,
                channels=[
                    ChannelSpec(
                        type="whatsapp", app="app", phone_number_id=phone, access_token=token
                    )
                ],
            )
        ],
    )
    apply_bots(db, spec)
    db.flush()
    bot_id = db.execute(select(Bot.id).order_by(Bot.id.desc()).limit(1)).scalar_one()
    db.commit()
    return TemplateBot(bot_id, phone, secret, token)


def default_template() -> TemplateSpec:
    return TemplateSpec(name=NAME, language=LANGUAGE, parameters=PARAMETERS)


@pytest.fixture
def lane(graph_sandbox: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The send lane pointed at the sandbox Graph API."""
    monkeypatch.setenv("PARLEY_GRAPH_API_URL", graph_sandbox)
    reset_settings()
    yield get_settings()
    monkeypatch.undo()
    reset_settings()


def deliver_old(client: TestClient, bot: TemplateBot, user: str, text: str = "still open?") -> None:
    """A message whose 24-hour window has closed (it was sent 25 hours ago)."""
    payload = simulator.whatsapp_text(
        phone_number_id=bot.phone_number_id,
        wa_id=user,
        text=text,
        timestamp=int(time.time()) - 25 * 3600,
    )
    body, headers = simulator.signed(payload, bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200


def template_status(
    client: TestClient, bot: TemplateBot, status: str, *, at: int, name: str = NAME
) -> None:
    """A signed ``message_template_status_update`` webhook through the real route."""
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": WABA,
                "time": at,
                "changes": [
                    {
                        "field": "message_template_status_update",
                        "value": {
                            "event": status,
                            "message_template_id": 1489012345678901,
                            "message_template_name": name,
                            "message_template_language": LANGUAGE,
                            "reason": "NONE",
                        },
                    }
                ],
            }
        ],
    }
    body, headers = simulator.signed(payload, bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200


def run_jobs(db: Session, task: str, run: Callable[[int], str]) -> list[str]:
    db.expire_all()
    ids = db.execute(
        select(OutboxJob.id)
        .where(OutboxJob.task == task, OutboxJob.state == "pending")
        .order_by(OutboxJob.id)
    ).scalars()
    return [run(i) for i in list(ids)]


def templates_of(db: Session, bot: TemplateBot) -> list[Message]:
    db.expire_all()
    workspace = db.execute(select(Bot.workspace_id).where(Bot.id == bot.bot_id)).scalar_one()
    return list(
        db.execute(
            select(Message)
            .where(Message.workspace_id == workspace, Message.kind == "template")
            .order_by(Message.id)
        ).scalars()
    )


def template_rows(db: Session, bot: TemplateBot) -> list[tuple[str, str, str, str]]:
    db.expire_all()
    app_id = db.execute(
        select(ChannelAccount.meta_app_id).where(ChannelAccount.external_id == bot.phone_number_id)
    ).scalar_one()
    rows = db.execute(
        select(Template.waba_id, Template.name, Template.language, Template.status).where(
            Template.meta_app_id == app_id
        )
    ).all()
    return [(r.waba_id, r.name, r.language, r.status) for r in rows]


def outcome_for(db: Session, reply_id: int) -> list[tuple[str, str | None]]:
    db.expire_all()
    return [
        (r.kind, r.detail)
        for r in db.execute(select(Outcome).where(Outcome.reply_id == reply_id)).scalars()
    ]


def expected_body(to: str, callback: str) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "template",
        "template": {
            "name": NAME,
            "language": {"code": LANGUAGE},
            "components": [
                {
                    "type": "body",
                    "parameters": [{"type": "text", "text": p} for p in PARAMETERS],
                }
            ],
        },
        "biz_opaque_callback_data": callback,
    }


def sandbox_sent(to: str) -> list[sandbox.SentMessage]:
    return sandbox.store.since(to=to, after=0)


# --- the pipeline -----------------------------------------------------------------------------


def test_without_a_template_the_window_expires_with_nothing_queued(
    client: TestClient, db: Session
) -> None:
    bot = make_bot(db, None)
    deliver_old(client, bot, "15557770001")
    run_jobs(db, "bots.reply", pipeline.reply)
    assert templates_of(db, bot) == []
    db.expire_all()
    workspace = db.execute(select(Bot.workspace_id).where(Bot.id == bot.bot_id)).scalar_one()
    inbound = db.execute(
        select(Message.id).where(Message.workspace_id == workspace, Message.direction == "in")
    ).scalar_one()
    outcome = db.get(Outcome, inbound)
    assert outcome is not None and (outcome.kind, outcome.detail) == ("window_expired", None)


def test_an_approved_template_goes_out_with_the_exact_request_body(
    client: TestClient, db: Session, lane: Settings
) -> None:
    user = "15557770002"
    bot = make_bot(db, default_template())
    template_status(client, bot, "APPROVED", at=int(time.time()))
    deliver_old(client, bot, user)
    run_jobs(db, "bots.reply", pipeline.reply)
    [message] = templates_of(db, bot)
    assert json.loads(message.body or "") == {
        "name": NAME,
        "language": LANGUAGE,
        "waba_id": None,
        "parameters": PARAMETERS,
    }
    assert outcome_for(db, message.id) == [("window_expired", f"template sent: {NAME}")]
    notices = db.execute(
        select(Notice.kind, Notice.episode).where(Notice.message_id == message.id)
    ).all()
    assert [(k, e.split(":")[0]) for k, e in notices] == [("template", "template")]
    # A second run of the pipeline queues nothing more.
    run_jobs(db, "bots.reply", pipeline.reply)
    assert len(templates_of(db, bot)) == 1

    results = run_jobs(db, "webhooks.send", send_tasks.send)
    assert "done" in results
    [sent] = sandbox_sent(user)
    assert sent.request == expected_body(user, f"{message.id}:0")
    assert sent.text == f"template:{NAME}"
    db.expire_all()
    chunk = db.execute(
        select(OutboundChunk).where(OutboundChunk.message_id == message.id)
    ).scalar_one()
    assert chunk.state == "sent" and chunk.provider_message_id == sent.id
    assert templates_of(db, bot)[0].status == "sent"


@pytest.mark.parametrize(
    ("status", "why"),
    [
        ("PENDING", f"template {NAME} ({LANGUAGE}) is PENDING, not APPROVED"),
        ("REJECTED", f"template {NAME} ({LANGUAGE}) is REJECTED, not APPROVED"),
        (None, f"template {NAME} ({LANGUAGE}) is unknown: no status webhook received"),
    ],
)
def test_a_template_that_is_not_approved_is_never_sent(
    client: TestClient, db: Session, lane: Settings, status: str | None, why: str
) -> None:
    user = f"1555777{secrets.randbelow(10**4):04d}"
    bot = make_bot(db, default_template())
    if status is not None:
        template_status(client, bot, status, at=int(time.time()))
    # Another Meta app's APPROVED template of the same name does not count.
    other = make_bot(db, None)
    template_status(client, other, "APPROVED", at=int(time.time()))
    deliver_old(client, bot, user)
    run_jobs(db, "bots.reply", pipeline.reply)
    [message] = templates_of(db, bot)
    assert run_jobs(db, "webhooks.send", send_tasks.send)
    assert sandbox_sent(user) == []
    [message] = templates_of(db, bot)
    assert message.status == "failed"
    assert message.last_error == why
    chunk = db.execute(
        select(OutboundChunk).where(OutboundChunk.message_id == message.id)
    ).scalar_one()
    assert (chunk.state, chunk.attempts, chunk.last_error) == ("failed", 0, why)
    assert outcome_for(db, message.id) == [("window_expired", f"template not sent: {why}")]


def test_a_status_webhook_flips_pending_to_approved_and_then_it_is_sent(
    client: TestClient, db: Session, lane: Settings
) -> None:
    user = "15557770003"
    bot = make_bot(db, default_template())
    now = int(time.time())
    template_status(client, bot, "PENDING", at=now - 120)
    assert template_rows(db, bot) == [(WABA, NAME, LANGUAGE, "PENDING")]

    deliver_old(client, bot, user, "first")
    run_jobs(db, "bots.reply", pipeline.reply)
    run_jobs(db, "webhooks.send", send_tasks.send)
    [pending] = templates_of(db, bot)
    assert pending.status == "failed" and "PENDING" in (pending.last_error or "")

    template_status(client, bot, "APPROVED", at=now - 60)
    # An older event arriving late does not undo the approval.
    template_status(client, bot, "PENDING", at=now - 90)
    assert template_rows(db, bot) == [(WABA, NAME, LANGUAGE, "APPROVED")]
    deliver_old(client, bot, user, "second")
    run_jobs(db, "bots.reply", pipeline.reply)
    run_jobs(db, "webhooks.send", send_tasks.send)
    first, second = templates_of(db, bot)
    assert first.id == pending.id and first.status == "failed"
    assert second.status == "sent"
    [sent] = sandbox_sent(user)
    assert sent.request == expected_body(user, f"{second.id}:0")
    assert outcome_for(db, second.id) == [("window_expired", f"template sent: {NAME}")]


# --- the YAML ---------------------------------------------------------------------------------

YAML = """\
workspace: acme
meta_apps:
  - name: acme-app
    app_secret: s3cret
    verify_token: verify-me
bots:
  - name: support
    system_prompt: You answer questions about Acme.
    window_template:
      name: order_update
      language: en_US
      parameters: ["Acme", "Friday"]
    channels:
      - type: whatsapp
        app: acme-app
        phone_number_id: "555000222"
        access_token: token
"""


def test_the_window_template_is_read_from_the_yaml_and_stored_on_the_bot(db: Session) -> None:
    spec = parse_bots(YAML.replace("acme", f"acme-{secrets.token_hex(3)}", 1), environ={})
    template = spec.bots[0].window_template
    assert template == TemplateSpec(name=NAME, language="en_US", parameters=["Acme", "Friday"])
    phone = str(100000000000000 + secrets.randbelow(10**12))
    spec = parse_bots(
        YAML.replace("acme", f"acme-{secrets.token_hex(3)}", 1).replace("555000222", phone),
        environ={},
    )
    apply_bots(db, spec)
    db.flush()
    bot_row = db.execute(select(Bot).order_by(Bot.id.desc()).limit(1)).scalar_one()
    assert bot_row.extra["window_template"] == {
        "name": NAME,
        "language": "en_US",
        "waba_id": None,
        "parameters": ["Acme", "Friday"],
    }
    # Removing the block removes the template; applying again changes nothing.
    without = spec.model_copy(
        update={"bots": [spec.bots[0].model_copy(update={"window_template": None})]}
    )
    report = apply_bots(db, without)
    assert f"bot {spec.bots[0].name}" in report.updated
    assert "window_template" not in bot_row.extra
    assert f"bot {spec.bots[0].name}" in apply_bots(db, without).unchanged
    db.rollback()


@pytest.mark.parametrize(
    ("old", "new", "line", "what"),
    [
        ("      name: order_update", "      name: Order Update", 10, "window_template.name"),
        ("      language: en_US", "      language: English!", 11, "window_template.language"),
        ('["Acme", "Friday"]', '["Acme", " "]', 12, "window_template.parameters.1"),
        ("      language: en_US\n", "      language: en_US\n      header: x\n", 12, "header"),
        ("      language: en_US\n", "", 10, "window_template.language: Field required"),
    ],
)
def test_template_block_errors_name_the_line(old: str, new: str, line: int, what: str) -> None:
    assert old in YAML
    with pytest.raises(ConfigError) as err:
        parse_bots(YAML.replace(old, new), environ={})
    assert what in err.value.message
    assert f"bots.yaml:{line}:" in err.value.message
