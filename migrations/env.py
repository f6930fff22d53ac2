"""Alembic environment: the URL comes from Parley's settings unless the caller passes a
connection (``parley migrate`` and the test fixtures do)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from core.config import get_settings
from core.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.execute("SET lock_timeout = '5s'")
            context.run_migrations()
        return
    engine = create_engine(get_settings().require_database_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.execute("SET lock_timeout = '5s'")
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `parley migrate`")
run_migrations_online()
