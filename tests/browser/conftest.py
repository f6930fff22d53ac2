"""Browser tier: Playwright driving Debian's Chromium (Playwright's own download cannot work here).

When Chromium is missing the whole tier is skipped with a visible reason; ``make test`` installs
it when running as root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium")
    if executable is None or os.environ.get("PARLEY_SKIP_BROWSER"):
        pytest.skip("Debian chromium is not installed: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()
