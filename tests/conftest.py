"""Test session set-up: real Postgres and Redis, one migrated template database per run.

* ``DATABASE_URL`` / ``REDIS_URL`` set → those servers are used (never stopped or reconfigured).
* unset → one embedded Postgres and one embedded Redis are started for the whole session, and
  their URLs are exported so every child process (API, workers) reaches the same pair.

In-process tests run inside one outer transaction per test that is rolled back at the end; code
that commits only releases a SAVEPOINT. Every Redis key of the run carries a unique prefix.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.config import Settings, get_settings, reset_settings
from inference import local
from tests.support import databases
from tests.support.processes import Proc, free_port

RUN_ID = secrets.token_hex(4)


def _export(key: str, value: str) -> None:
    os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    started: list[Any] = []
    # Not under pytest's tmp dir: a concurrent pytest run resets that to mode 0700, and the
    # embedded Postgres runs as its own system user, which must reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="parley-test-"))
    if not os.environ.get("DATABASE_URL"):
        from parley import embedded

        pg = embedded.start_postgres(root)
        started.append(pg)
        _export("DATABASE_URL", pg.url)
    if not os.environ.get("REDIS_URL"):
        from parley import embedded

        rd = embedded.start_redis(root)
        started.append(rd)
        _export("REDIS_URL", rd.url)
    _export("PARLEY_ENV", "development")
    _export("PARLEY_REDIS_PREFIX", f"parley-test-{RUN_ID}:")
    _export("PARLEY_DATA_DIR", str(root / "data"))
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    _export("PARLEY_ENCRYPTION_KEYS", f"test1:{key}")
    _export("PARLEY_LOG_FORMAT", "json")
    for var in ("PARLEY_INFERENCE_ENDPOINTS", "PARLEY_GRAPH_API_URL"):
        os.environ.pop(var, None)
    reset_settings()
    from core.crypto import get_keyring

    get_keyring.cache_clear()
    from core.celery_app import configure_celery

    configure_celery(get_settings())
    yield get_settings()
    _flush_prefix(get_settings())
    for service in reversed(started):
        service.stop()
    shutil.rmtree(root, ignore_errors=True)


def _flush_prefix(settings: Settings) -> None:
    try:
        client = redis.Redis.from_url(settings.require_redis_url())
        for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=500):
            client.delete(key)
        client.close()
    except redis.RedisError:
        pass


@pytest.fixture(scope="session")
def model_server(services: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real local model (SmolLM2-135M-Instruct on llama.cpp), shared by the whole run."""
    port = free_port()
    log_dir = tmp_path_factory.mktemp("model")
    proc = Proc(
        "model",
        local.server_command(port=port, threads=2, n_ctx=4096),
        os.environ,
        log_dir,
    )
    try:
        local.wait_until_ready(f"http://127.0.0.1:{port}", timeout=120, proc=proc.popen)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def template_db(services: Settings) -> Iterator[str]:
    """A database migrated with Alembic once per run; others are created from it."""
    from parley import migrate

    name = databases.create_database("parley_tpl")
    engine = create_engine(databases.url_for(name), poolclass=NullPool)
    migrate.upgrade(engine)
    engine.dispose()
    yield name
    databases.drop_database(name)


@pytest.fixture(scope="session")
def engine(template_db: str) -> Iterator[Engine]:
    name = databases.create_database("parley_unit", template=template_db)
    eng = create_engine(databases.url_for(name), pool_size=2)
    yield eng
    eng.dispose()
    databases.drop_database(name)


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        outer = conn.begin()
        yield conn
        outer.rollback()


@pytest.fixture
def factory(connection: Connection) -> Iterator[sessionmaker[Session]]:
    """Sessions bound to the test's transaction; ``commit()`` releases a SAVEPOINT only.

    It is also the process default, so task bodies run in-process use the same transaction.
    """
    from core.db import use_sessionmaker

    maker = sessionmaker(
        bind=connection,
        join_transaction_mode="create_savepoint",
        expire_on_commit=False,
        autoflush=False,
    )
    with use_sessionmaker(maker):
        yield maker


@pytest.fixture
def db(factory: sessionmaker[Session]) -> Iterator[Session]:
    session = factory()
    yield session
    session.close()


@pytest.fixture
def redis_client(services: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(services.require_redis_url())
    yield client
    client.close()


# --- one timing line per test tier ------------------------------------------------------------

_tier_seconds: dict[str, float] = defaultdict(float)
_session_start = time.monotonic()


def _tier(nodeid: str) -> str:
    parts = Path(nodeid.split("::")[0]).parts
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _tier_seconds[_tier(report.nodeid)] += report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for tier in sorted(_tier_seconds):
        terminalreporter.write_line(f"timing: tier {tier} {_tier_seconds[tier]:.1f}s")
    terminalreporter.write_line(f"timing: tests total {time.monotonic() - _session_start:.1f}s")
