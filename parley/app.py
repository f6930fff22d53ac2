"""``create_app()``: the API process (webhooks, health, docs, and the sandbox in development)."""

from __future__ import annotations

from typing import Any

import redis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings, get_settings
from core.db import make_sessionmaker, session_scope
from core.errors import AppError
from core.models import ChannelAccount
from inference import InferenceClient
from parley import migrate
from webhooks import endpoints as webhook_endpoints
from webhooks import sandbox

log = structlog.get_logger()


def create_app(
    settings: Settings | None = None, factory: sessionmaker[Session] | None = None
) -> FastAPI:
    settings = settings or get_settings()
    # Swagger UI and ReDoc assets come from the fastapi-offline wheel: no CDN is reachable.
    app = FastAPIOffline(
        title="Parley",
        version="0.1.0",
        description="Meta messaging channels answered by self-hosted LLaMA models.",
        static_url="/docs-assets",
    )
    app.state.settings = settings
    app.state.sessionmaker = factory or make_sessionmaker()
    app.include_router(webhook_endpoints.router)
    if settings.sandbox and not settings.is_production:
        app.include_router(sandbox.router)
    _install_errors(app)
    _install_health(app)
    app.add_middleware(webhook_endpoints.WebhookFastPath)
    return app


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return webhook_endpoints.error_response(exc)

    @app.exception_handler(DBAPIError)
    async def database_down(_: Request, exc: DBAPIError) -> JSONResponse:
        return webhook_endpoints.error_response(webhook_endpoints.database_unavailable(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": errors}, status_code=422)


def _install_health(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """200 when Postgres accepts a write and the schema is at head. Redis, the model servers
        and channel accounts are reported in ``detail`` but never fail it: while they are down
        the API keeps acknowledging webhooks and the outbox holds the work."""
        settings: Settings = request.app.state.settings
        factory: sessionmaker[Session] = request.app.state.sessionmaker
        detail: dict[str, Any] = {}
        ready = True
        try:
            with session_scope(factory) as session:
                # txid_current() needs a writable primary: a read-only replica refuses it.
                session.execute(text("SELECT txid_current()"))
                revision = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
                accounts = dict(
                    session.execute(
                        select(ChannelAccount.status, func.count()).group_by(ChannelAccount.status)
                    ).all()
                )
            expected = migrate.head()
            detail["postgres"] = "ok"
            detail["migrations"] = {"current": revision, "head": expected}
            detail["channel_accounts"] = accounts
            if revision != expected:
                ready = False
        except Exception as exc:  # noqa: BLE001  # readiness reports, it does not raise
            detail["postgres"] = f"error: {type(exc).__name__}"
            ready = False
        detail["redis"] = _redis_state(settings)
        detail["inference"] = _inference_state(settings)
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "detail": detail},
            status_code=200 if ready else 503,
        )


def _redis_state(settings: Settings) -> str:
    if not settings.redis_url:
        return "not configured"
    try:
        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1, socket_timeout=1
        )
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


def _inference_state(settings: Settings) -> list[dict[str, Any]]:
    if not settings.inference_endpoints:
        return []
    client = InferenceClient.from_settings(settings)
    try:
        return [
            {"url": endpoint.url, "role": endpoint.role, "healthy": healthy, "detail": why}
            for endpoint, healthy, why in client.health()
        ]
    finally:
        client.close()
