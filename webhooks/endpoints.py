"""Webhook routes: thin — read the bounded body, verify, parse, await the group commit, answer."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from core.config import Settings
from core.db import engine_for, make_sessionmaker, session_scope
from core.errors import (
    AppError,
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    Unavailable,
    error_body,
)
from webhooks import service
from webhooks.batcher import IntakeBatcher
from webhooks.channels import meta
from webhooks.directory import Directory

log = structlog.get_logger()

MAX_BODY = 4 * 1024 * 1024  # Meta sends up to 3 MB; anything above this is not Meta

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    return factory


Factory = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]


async def bounded_body(request: Request) -> bytes:
    """The raw request body, refused with 413 as soon as it passes :data:`MAX_BODY`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge(f"body larger than {MAX_BODY} bytes")
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge(f"body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _handshake(
    factory: sessionmaker[Session],
    channel: str,
    mode: str | None,
    token: str | None,
    challenge: str | None,
) -> PlainTextResponse:
    """Meta's subscription handshake: echo ``hub.challenge`` when the token matches one of the
    channel's verify tokens (``MetaApp.verify_token`` or that channel's own token)."""
    with session_scope(factory) as session:
        try:
            answer = service.verify_handshake(
                session, meta.Handshake(mode, token, challenge), channel
            )
        except meta.HandshakeError as exc:
            if exc.status == 400:
                raise BadRequest(exc.reason, code="missing_challenge") from exc
            raise Forbidden(exc.reason) from exc
    return PlainTextResponse(answer)


Mode = Annotated[str | None, Query(alias="hub.mode")]
Token = Annotated[str | None, Query(alias="hub.verify_token")]
Challenge = Annotated[str | None, Query(alias="hub.challenge")]


@router.get("/whatsapp", response_class=PlainTextResponse)
def verify_whatsapp(
    factory: Factory, mode: Mode = None, token: Token = None, challenge: Challenge = None
) -> PlainTextResponse:
    return _handshake(factory, "whatsapp", mode, token, challenge)


@router.get("/messenger", response_class=PlainTextResponse)
def verify_messenger(
    factory: Factory, mode: Mode = None, token: Token = None, challenge: Challenge = None
) -> PlainTextResponse:
    return _handshake(factory, "messenger", mode, token, challenge)


@router.get("/instagram", response_class=PlainTextResponse)
def verify_instagram(
    factory: Factory, mode: Mode = None, token: Token = None, challenge: Challenge = None
) -> PlainTextResponse:
    return _handshake(factory, "instagram", mode, token, challenge)


@dataclass(frozen=True)
class Intake:
    """The app's cached apps and routes, and its group-commit writer."""

    directory: Directory
    batcher: IntakeBatcher


_intake_lock = threading.Lock()


def intake_for(app: FastAPI) -> Intake:
    with _intake_lock:
        intake: Intake | None = getattr(app.state, "intake", None)
        if intake is None:
            settings: Settings = app.state.settings
            factory: sessionmaker[Session] = app.state.sessionmaker
            directory = Directory(factory, ttl=settings.routing_cache_seconds)
            writer = _writer_factory(factory)
            intake = Intake(
                directory,
                IntakeBatcher(
                    writer or factory,
                    directory,
                    max_requests=settings.intake_batch_max,
                    max_wait=settings.intake_batch_wait,
                    overlap=writer is not None,
                ),
            )
            app.state.intake = intake
        return intake


def _writer_factory(factory: sessionmaker[Session]) -> sessionmaker[Session] | None:
    """The writer's own sessions, for an app bound to an engine: three connections (one batch
    committing, one waiting to, one being applied) without a ping at each checkout (the
    batcher re-applies a batch whose connection turned out dead). None for an app bound to
    one connection (a test's), whose batches are applied and committed one at a time."""
    bind = factory.kw.get("bind")
    if not isinstance(bind, Engine):
        return None
    url = bind.url.render_as_string(hide_password=False)
    return make_sessionmaker(engine_for(url, pool_size=3, pre_ping=False))


# Bodies above this are parsed on a worker thread rather than on the event loop.
PARSE_INLINE_MAX = 64 * 1024


async def _receive(request: Request, channel: str) -> JSONResponse:
    """Verify, parse, then wait for the delivery's group commit; 200 only once it is durable.

    Runs on the event loop: the apps come from the cache (read on a worker thread when stale),
    and the request waits for the writer thread's commit without holding a thread itself. The
    body is read here rather than through a dependency: this is the hottest route."""
    body = await bounded_body(request)
    intake = intake_for(request.app)
    directory = intake.directory
    signature = request.headers.get("x-hub-signature-256")
    apps = directory.apps() if directory.apps_fresh() else await run_in_threadpool(directory.apps)
    app = service.signing_app(apps, body, signature, channel)
    if app is None and directory.may_force():
        # A secret added or rotated since the cache was read: read the apps again, once.
        apps = await run_in_threadpool(directory.refresh_apps)
        app = service.signing_app(apps, body, signature, channel)
    if app is None:
        raise service.reject_signature(channel)
    if len(body) <= PARSE_INLINE_MAX:
        events = service.parse(channel, body)
    else:
        events = await run_in_threadpool(service.parse, channel, body)
    done = intake.batcher.submit(service.Delivery(channel, app, events))
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(done), timeout=COMMIT_TIMEOUT)
    except TimeoutError as exc:
        raise Unavailable("the delivery could not be stored in time; retry later") from exc
    return JSONResponse(result.as_json())


COMMIT_TIMEOUT = 30.0  # seconds a request waits for its batch (Meta's own timeout is longer)


@router.post("/whatsapp")
async def receive_whatsapp(request: Request) -> JSONResponse:
    """WhatsApp Cloud API (``object: whatsapp_business_account``): every event of the delivery
    is stored in one transaction, group-committed with other deliveries, and answered 200 only
    after that commit. If any event fails, the delivery is rolled back and answered 5xx, so
    Meta delivers it again (message ids and upserts make the retry safe)."""
    return await _receive(request, "whatsapp")


@router.post("/messenger")
async def receive_messenger(request: Request) -> JSONResponse:
    """Messenger (``object: page``): every ``entry[].messaging[]``/``standby[]`` event, stored
    and answered as WhatsApp's; signed with the Meta app's secret."""
    return await _receive(request, "messenger")


@router.post("/instagram")
async def receive_instagram(request: Request) -> JSONResponse:
    """Instagram (``object: instagram``), as Messenger. Signed with the app's
    ``instagram_app_secret`` when set, else its app secret (UNVERIFIED: Instagram API with
    Instagram Login may sign with the Instagram app's secret)."""
    return await _receive(request, "instagram")


class WebhookFastPath:
    """Serves ``POST /webhooks/{channel}`` with :func:`_receive` straight from the ASGI scope,
    ahead of FastAPI's router, dependency resolution and exception middleware: the webhook
    routes carry nearly all of the API's traffic, and that machinery cost about a seventh of
    the API's CPU per webhook (``bench/ingest.py``). ``create_app`` installs it; the routes
    above stay declared, for the OpenAPI document and for a router used without it. Errors
    are answered as the app's exception handlers answer them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.paths = {f"{router.prefix}/{c}": c for c in service.CHANNELS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        channel = self.paths.get(scope["path"]) if scope["type"] == "http" else None
        if channel is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await _receive(Request(scope, receive), channel)
        except DBAPIError as exc:
            response = error_response(database_unavailable(exc))
        except AppError as exc:
            response = error_response(exc)
        await response(scope, receive, send)


def error_response(exc: AppError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status_code)


def database_unavailable(exc: DBAPIError) -> Unavailable:
    # Not committed, so not acknowledged: Meta retries, and dedupe absorbs the retry.
    log.error("api.database_error", error=type(exc.orig).__name__)
    return Unavailable("try again later", code="database_unavailable")
