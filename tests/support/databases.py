"""Test databases on whatever server DATABASE_URL names (the machine's or an embedded one)."""

from __future__ import annotations

import secrets

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from core.config import get_settings


def server_url() -> str:
    return get_settings().require_database_url()


def url_for(name: str) -> str:
    return make_url(server_url()).set(database=name).render_as_string(hide_password=False)


def create_database(prefix: str, *, template: str | None = None) -> str:
    name = f"{prefix}_{secrets.token_hex(4)}"
    engine = create_engine(server_url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        clause = f" TEMPLATE {template}" if template else ""
        conn.execute(text(f"CREATE DATABASE {name}{clause}"))
    engine.dispose()
    return name


def drop_database(name: str) -> None:
    engine = create_engine(server_url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    engine.dispose()
