from __future__ import annotations

from collections.abc import Iterator

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
