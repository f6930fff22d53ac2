"""Database engine and the session boundary.

Services and repositories only ``flush()``; the boundary (a request dependency, a task wrapper,
a CLI command) owns the transaction through :func:`session_scope`, which commits or rolls back and
then releases the jobs buffered during the transaction (see :mod:`core.jobs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from core.config import get_settings


@lru_cache(maxsize=4)
def engine_for(url: str, pool_size: int = 8, *, pre_ping: bool = True) -> Engine:
    """The process's engine for ``url``. ``pre_ping=False`` is for a caller that retries a
    transaction whose connection turned out dead (the intake's writer): it saves a round trip
    per checkout."""
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=4,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
    )

    @event.listens_for(engine, "connect")
    def _utc(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]  # DBAPI hook
        with dbapi_connection.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    return engine


def get_engine() -> Engine:
    return engine_for(get_settings().require_database_url())


_default: sessionmaker[Session] | None = None


def make_sessionmaker(engine: Engine | None = None) -> sessionmaker[Session]:
    """A session factory for ``engine``, or the process default (see :func:`use_sessionmaker`)."""
    if engine is None and _default is not None:
        return _default
    return _sessionmaker_for(engine or get_engine())


@lru_cache(maxsize=4)
def _sessionmaker_for(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


@contextmanager
def use_sessionmaker(factory: sessionmaker[Session]) -> Iterator[None]:
    """Make ``factory`` the process default, e.g. one bound to a test's outer transaction."""
    global _default
    previous, _default = _default, factory
    try:
        yield
    finally:
        _default = previous


@contextmanager
def session_scope(factory: sessionmaker[Session] | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception.

    Jobs enqueued through :func:`core.jobs.enqueue` inside the block are sent to the broker only
    after the commit succeeds, and dropped on rollback.
    """
    session = (factory or make_sessionmaker())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
