from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from parley.app import create_app
from tests.support.factories import WhatsAppBot, create_whatsapp_bot

if TYPE_CHECKING:
    from tests.support.vllm import VllmServer


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


# --- real vLLM servers (``make test-vllm``) ---------------------------------------------------


@pytest.fixture(scope="session")
def vllm_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VllmServer]]:
    """Two real vLLM servers on CPU for the whole run, or a skip when none were asked for.

    ``PARLEY_TEST_VLLM=start`` (what ``make test-vllm`` sets) starts them here and stops them
    at the end; ``PARLEY_TEST_VLLM=URL1,URL2`` uses servers already running.
    """
    from tests.support import vllm

    spec = os.environ.get(vllm.ENV_VAR, "").strip()
    if not spec:
        pytest.skip(f"needs two real vLLM servers: run `make test-vllm` ({vllm.ENV_VAR} unset)")
    if spec != "start":
        urls = [url.strip() for url in spec.split(",") if url.strip()]
        if len(urls) != 2:
            pytest.fail(f"{vllm.ENV_VAR} must be 'start' or two URLs, not {spec!r}")
        yield vllm.external_pair(urls)
        return
    pair = vllm.start_pair(tmp_path_factory.mktemp("vllm"))
    try:
        yield pair
    finally:
        vllm.stop_all(pair)


@pytest.fixture
def vllm_pair(vllm_servers: list[VllmServer]) -> list[VllmServer]:
    """The two servers, both running: one a test killed is started again first."""
    from tests.support import vllm

    vllm.restart_dead(vllm_servers)
    return vllm_servers
