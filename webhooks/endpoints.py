"""Webhook routes: thin — read the bounded body, call the intake service, commit, answer."""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.db import session_scope
from core.errors import BadRequest, Forbidden, PayloadTooLarge
from webhooks import service
from webhooks.batcher import StatusBatcher
from webhooks.channels import meta

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


_batcher_lock = threading.Lock()


def status_batcher(request: Request) -> StatusBatcher | None:
    """The app's group-commit writer for status-only deliveries (None when turned off)."""
    settings: Settings = request.app.state.settings
    if settings.status_batch_max <= 0:
        return None
    with _batcher_lock:
        batcher: StatusBatcher | None = getattr(request.app.state, "status_batcher", None)
        if batcher is None:
            batcher = StatusBatcher(
                get_sessionmaker(request),
                max_requests=settings.status_batch_max,
                max_wait=settings.status_batch_wait,
            )
            request.app.state.status_batcher = batcher
        return batcher


@router.post("/whatsapp")
def receive_whatsapp(
    request: Request,
    factory: Factory,
    body: Annotated[bytes, Depends(bounded_body)],
) -> JSONResponse:
    """Store every event of the delivery, then answer 200 (only after the commit).

    A delivery of statuses only is group-committed with other such deliveries and answered
    once its batch is committed; anything else commits in this request. If any event fails
    the whole delivery rolls back and the answer is 5xx, so Meta delivers it again."""
    signature = request.headers.get("x-hub-signature-256")
    batcher = None
    with session_scope(factory) as session:
        app, events = service.read_whatsapp(session, body, signature)
        if service.status_only(events):
            batcher = status_batcher(request)
        if batcher is None:
            result = service.store_whatsapp(session, app, events)
    if batcher is not None:
        result = service.apply_status_batch(batcher, app, events)
    return JSONResponse(result.as_json())


def _receive(
    factory: sessionmaker[Session], channel: str, body: bytes, signature: str | None
) -> JSONResponse:
    with session_scope(factory) as session:
        app, events = service.read_delivery(session, channel, body, signature)
        result = service.store_events(session, app, events, channel=channel)
    return JSONResponse(result.as_json())


@router.post("/messenger")
def receive_messenger(
    request: Request,
    factory: Factory,
    body: Annotated[bytes, Depends(bounded_body)],
) -> JSONResponse:
    """Messenger (``object: page``): every ``entry[].messaging[]``/``standby[]`` event in one
    transaction, answered 200 after the commit; signed with the Meta app's secret."""
    return _receive(factory, "messenger", body, request.headers.get("x-hub-signature-256"))


@router.post("/instagram")
def receive_instagram(
    request: Request,
    factory: Factory,
    body: Annotated[bytes, Depends(bounded_body)],
) -> JSONResponse:
    """Instagram (``object: instagram``), as Messenger. Signed with the app's
    ``instagram_app_secret`` when set, else its app secret (UNVERIFIED: Instagram API with
    Instagram Login may sign with the Instagram app's secret)."""
    return _receive(factory, "instagram", body, request.headers.get("x-hub-signature-256"))
