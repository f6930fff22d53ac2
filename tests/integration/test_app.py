"""Health, readiness, offline docs and the sandbox Graph API's Meta-shaped answers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from core.config import Settings


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_reports_dependencies_without_failing_on_them(
    client: TestClient, services: Settings
) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    detail = r.json()["detail"]
    assert detail["postgres"] == "ok"
    assert detail["migrations"]["current"] == detail["migrations"]["head"]
    assert detail["redis"] == "ok"
    assert detail["inference"] == []


def test_readyz_stays_ready_when_redis_and_models_are_down(
    services: Settings, factory: object
) -> None:
    from parley.app import create_app

    broken = services.model_copy(
        update={
            "redis_url": "redis://127.0.0.1:1/0",
            "inference_endpoints": "http://127.0.0.1:1#model=x",
        }
    )
    with TestClient(create_app(broken, factory)) as c:  # type: ignore[arg-type]
        r = c.get("/readyz")
    assert r.status_code == 200
    detail = r.json()["detail"]
    assert detail["redis"].startswith("error")
    assert detail["inference"][0]["healthy"] is False


def test_readyz_fails_when_schema_is_behind(client: TestClient, db: Session) -> None:
    db.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    db.commit()
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["detail"]["migrations"]["current"] == "older"


def test_docs_are_served_without_a_cdn(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn." not in page.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "/webhooks/whatsapp" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        (
            {},
            {"messaging_product": "whatsapp", "to": "1", "type": "text", "text": {"body": "x"}},
            401,
            190,
        ),
        ({"Authorization": "Bearer t"}, {"to": "1"}, 400, 100),
        (
            {"Authorization": "Bearer t"},
            {
                "messaging_product": "whatsapp",
                "to": "1",
                "type": "text",
                "text": {"body": "x" * 4097},
            },
            400,
            100,
        ),
    ],
)
def test_sandbox_answers_errors_like_meta(
    client: TestClient, headers: dict[str, str], body: dict[str, object], status: int, code: int
) -> None:
    r = client.post("/sandbox/graph/v23.0/123/messages", json=body, headers=headers)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code


def test_sandbox_accepts_and_lists_sends(client: TestClient) -> None:
    body = {
        "messaging_product": "whatsapp",
        "to": "15550009999",
        "type": "text",
        "text": {"body": "hello"},
    }
    r = client.post(
        "/sandbox/graph/v23.0/123/messages", json=body, headers={"Authorization": "Bearer t"}
    )
    assert r.status_code == 200
    wamid = r.json()["messages"][0]["id"]
    assert r.json()["contacts"] == [{"input": "15550009999", "wa_id": "15550009999"}]
    sent = client.get("/sandbox/sent", params={"to": "15550009999"}).json()["messages"]
    assert sent[-1]["id"] == wamid and sent[-1]["text"] == "hello"
    r = client.post(
        "/sandbox/graph/v23.0/123/messages", content=b"nope", headers={"Authorization": "Bearer t"}
    )
    assert r.status_code == 400


def test_sandbox_is_absent_in_production(services: Settings, factory: object) -> None:
    from parley.app import create_app

    prod = services.model_copy(update={"sandbox": False})
    with TestClient(create_app(prod, factory)) as c:  # type: ignore[arg-type]
        assert c.get("/sandbox/sent").status_code == 404


@pytest.mark.parametrize("channel", ["whatsapp", "messenger", "instagram"])
def test_a_webhook_while_postgres_is_unreachable_is_503_and_not_acknowledged(
    services: Settings, channel: str
) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from parley.app import create_app
    from webhooks import simulator

    engine = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 1}
    )
    body, headers = simulator.signed({"object": "page", "entry": []}, "secret")
    try:
        with TestClient(create_app(services, sessionmaker(bind=engine))) as c:
            r = c.post(f"/webhooks/{channel}", content=body, headers=headers)
    finally:
        engine.dispose()
    assert r.status_code == 503
    assert r.json() == {"error": "database_unavailable", "detail": "try again later"}
