"""The overview (dashboard's first page, and `parley status`) counts what Postgres and Redis
hold, scoped to one workspace or the whole install."""

from __future__ import annotations

import json

import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from core.config import Settings
from core.models import Workspace
from dashboard.overview import overview
from tests.support.factories import create_whatsapp_bot
from webhooks import simulator


def _deliver(client: TestClient, phone: str, secret: str, wa_id: str) -> None:
    payload = simulator.whatsapp_text(phone_number_id=phone, wa_id=wa_id, text="hello")
    body, headers = simulator.signed(payload, secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200


def test_overview_counts_traffic_queues_and_accounts_per_workspace(
    client: TestClient, db: Session, services: Settings, redis_client: redis.Redis
) -> None:
    a = create_whatsapp_bot(db, workspace="ws-a")
    b = create_whatsapp_bot(db, workspace="ws-b")
    db.commit()
    for wa_id in ("1", "2", "3"):
        _deliver(client, a.phone_number_id, a.app_secret, wa_id)
    _deliver(client, b.phone_number_id, b.app_secret, "4")
    ws_a = db.execute(select(Workspace.id).where(Workspace.name == "ws-a")).scalar_one()

    scoped = overview(db, services, workspace_id=ws_a, minutes=5)
    assert scoped.messages_in_per_minute == round(3 / 5, 2)
    assert scoped.channel_accounts == {"active": 1}
    whole = overview(db, services, minutes=1)
    assert whole.messages_in_per_minute == 4.0
    assert whole.channel_accounts == {"active": 2}
    assert whole.pending_jobs >= 4
    depth = redis_client.llen(f"{services.redis_prefix}conversations")
    assert whole.queue_depth["conversations"] == depth and depth >= 4
    assert set(whole.queue_depth) == {"conversations", "send", "maintenance"}


def test_overview_survives_redis_being_down(db: Session, services: Settings) -> None:
    broken = services.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    view = overview(db, broken)
    assert view.queue_depth == {"conversations": None, "send": None, "maintenance": None}


def test_status_command_prints_the_overview(db: Session) -> None:
    from parley.cli import app

    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) >= {"messages_in_per_minute", "queue_depth", "outcomes_last_hour"}
