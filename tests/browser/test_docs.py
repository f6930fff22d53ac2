"""The API docs render in a real browser from assets the app serves itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker

from core.config import Settings
from parley.app import create_app
from tests.support.servers import ThreadServer

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def api(services: Settings) -> Iterator[str]:
    server = ThreadServer(create_app(services, sessionmaker()))
    yield server.url
    server.close()


def test_docs_render_the_operation_list(browser: Any, api: str) -> None:
    page = browser.new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.goto(f"{api}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/webhooks/whatsapp" in p for p in paths), paths
    assert any("/readyz" in p for p in paths), paths
    assert failed == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs.png"))
    page.close()
