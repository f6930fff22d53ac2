from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from parley.app import create_app
from tests.support.factories import WhatsAppBot, create_whatsapp_bot


@pytest.fixture
def client(services: Settings, factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(services, factory), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def wa_bot(db: Session) -> WhatsAppBot:
    bot = create_whatsapp_bot(db)
    db.commit()
    return bot


@pytest.fixture(scope="session")
def graph_sandbox(services: Settings) -> Iterator[str]:
    """The app's sandbox Graph API served on a real port (the send lane talks HTTP to it)."""
    from sqlalchemy.orm import sessionmaker as _sm

    from tests.support.servers import ThreadServer

    server = ThreadServer(create_app(services, _sm()))
    yield f"{server.url}/sandbox/graph"
    server.close()


@pytest.fixture
def use_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Point the process at a model server (and a Graph API) for the duration of one test."""
    from core.config import reset_settings

    def point(url: str, graph: str | None = None) -> None:
        monkeypatch.setenv("PARLEY_INFERENCE_ENDPOINTS", f"{url}#model=smollm2")
        if graph:
            monkeypatch.setenv("PARLEY_GRAPH_API_URL", graph)
        reset_settings()

    yield point
    monkeypatch.undo()
    reset_settings()
