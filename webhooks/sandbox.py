"""A sandbox Graph API for development: it answers sends the way Meta does, keeps them, per
recipient, for ``parley chat`` and the tests to read, and reports on them the way Meta does.
Never mounted in production.

For each accepted WhatsApp send it posts signed ``statuses`` webhooks (``sent``, then
``delivered``) carrying the send's ``biz_opaque_callback_data`` to this API's
``/webhooks/whatsapp`` (or ``PARLEY_SANDBOX_WEBHOOK_URL``) after ``PARLEY_SANDBOX_WEBHOOK_DELAY``
seconds, from a background thread that never holds up the send's answer. They are signed with the
secret of the Meta app that owns the phone number, read from the database.

Messenger and Instagram sends (``/{page or IG id}/messages``, or ``/me/messages``; a Bearer
token or ``access_token``) are checked the way Meta checks them — ``messaging_type`` present,
``tag`` exactly with ``MESSAGE_TAG``, Messenger text under 2000 characters, Instagram text at most
1000 UTF-8 bytes — answered ``{"recipient_id", "message_id"}``, kept like WhatsApp sends, and
followed after the same delay by a signed ``is_echo`` webhook to ``/webhooks/messenger`` (carrying
the send's ``metadata``) or ``/webhooks/instagram`` (no correlation field, as on Instagram). The
account's channel is looked up by its id; ``/me`` sends count as Messenger and get no echo (the
sandbox cannot tell the page from a token). ``sender_action`` requests and WhatsApp read/typing
requests are kept apart (``store.actions``). ``PARLEY_SANDBOX_WEBHOOK_URL`` may contain
``{channel}``.

Fault modes (``PARLEY_SANDBOX_FAULTS``, e.g. ``429=0.01,500=0.02,stall=0.005,drop_webhooks=0.1``;
each a probability per send, drawn from ``PARLEY_SANDBOX_SEED`` when set):

* ``429``: refused with HTTP 429, ``Retry-After`` (``retry_after=`` seconds, default 1) and Meta's
  throughput error body (code 130429);
* ``500`` (or ``5xx``): refused with HTTP 500 and Meta's unknown-error body (code 131000);
* ``stall``: accepted and recorded (its webhooks follow), but the answer is held for
  ``PARLEY_SANDBOX_STALL_SECONDS``, past the client's timeout: the ambiguous case;
* ``drop_webhooks``: accepted, but no status webhook is ever posted for it.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import httpx
import structlog
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from core.config import Settings
from core.db import session_scope
from webhooks import repository, simulator

log = structlog.get_logger()

router = APIRouter(prefix="/sandbox", tags=["sandbox"])


@dataclass(frozen=True)
class SentMessage:
    seq: int  # the order in which the sandbox accepted sends (1, 2, 3, …)
    id: str
    account: str
    to: str
    text: str
    at: float  # when it was accepted (Unix time)
    biz_opaque_callback_data: str | None = None
    order: int = 0  # same as seq: the accepting order
    fault: str | None = None  # "stall" when the answer was held past the client's timeout
    channel: str = "whatsapp"
    messaging_type: str | None = None  # Messenger/Instagram
    tag: str | None = None
    metadata: str | None = None  # Messenger
    request: dict[str, Any] | None = None  # the JSON body exactly as received


@dataclass(frozen=True)
class SenderAction:
    """A read/typing request: WhatsApp ``status: read``, Messenger/IG ``sender_action``."""

    channel: str
    account: str
    request: dict[str, Any]
    at: float


class SandboxStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: list[SentMessage] = []
        self.actions: list[SenderAction] = []

    def add(
        self,
        *,
        account: str,
        to: str,
        text: str,
        callback_data: str | None = None,
        fault: str | None = None,
        channel: str = "whatsapp",
        messaging_type: str | None = None,
        tag: str | None = None,
        metadata: str | None = None,
        request: dict[str, Any] | None = None,
    ) -> SentMessage:
        with self._lock:
            if channel == "whatsapp":
                provider_id = "wamid.SANDBOX" + secrets.token_hex(12).upper()
            else:
                provider_id = "m_SANDBOX" + secrets.token_hex(16)
            seq = len(self._sent) + 1
            item = SentMessage(
                seq=seq,
                id=provider_id,
                account=account,
                to=to,
                text=text,
                at=time.time(),
                biz_opaque_callback_data=callback_data,
                order=seq,
                fault=fault,
                channel=channel,
                messaging_type=messaging_type,
                tag=tag,
                metadata=metadata,
                request=request,
            )
            self._sent.append(item)
            return item

    def add_action(self, *, channel: str, account: str, request: dict[str, Any]) -> SenderAction:
        with self._lock:
            item = SenderAction(channel, account, request, time.time())
            self.actions.append(item)
            return item

    def since(self, *, to: str | None, after: int) -> list[SentMessage]:
        with self._lock:
            return [m for m in self._sent[after:] if to is None or m.to == to]


store = SandboxStore()


# --- faults -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    throttle: float = 0.0
    server_error: float = 0.0
    stall: float = 0.0
    drop_webhooks: float = 0.0
    retry_after: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """``"429=0.01,500=0.02,stall=0.005,drop_webhooks=0.0,retry_after=2"``."""
        names = {
            "429": "throttle",
            "500": "server_error",
            "5xx": "server_error",
            "stall": "stall",
            "drop_webhooks": "drop_webhooks",
            "retry_after": "retry_after",
        }
        values: dict[str, float] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key, _, raw = part.partition("=")
            name = names.get(key.strip())
            if name is None:
                raise ValueError(f"unknown sandbox fault {key.strip()!r}")
            values[name] = float(raw)
        return cls(**values)


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    secret: str = field(compare=False, repr=False)
    payload: dict[str, Any] = field(compare=False)


class WebhookSender:
    """Posts scheduled webhooks, signed, from one background thread (exits when idle)."""

    def __init__(self, *, idle_exit: float = 30.0) -> None:
        self.idle_exit = idle_exit
        self._heap: list[_Delivery] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = 0
        self._seq = 0
        self.posted = 0
        self.failed = 0

    def schedule(self, *, url: str, secret: str, payload: dict[str, Any], delay: float) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(
                self._heap, _Delivery(time.monotonic() + delay, self._seq, url, secret, payload)
            )
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sandbox-webhooks", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every scheduled webhook was posted (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _run(self) -> None:
        http = httpx.Client(timeout=10.0)
        try:
            while True:
                with self._cond:
                    idle_since = time.monotonic()
                    while not self._heap or self._heap[0].due > time.monotonic():
                        if not self._heap and time.monotonic() - idle_since > self.idle_exit:
                            self._thread = None
                            return
                        wait = self._heap[0].due - time.monotonic() if self._heap else 1.0
                        self._cond.wait(max(0.001, min(wait, 1.0)))
                    item = heapq.heappop(self._heap)
                    self._busy += 1
                try:
                    self._post(http, item)
                finally:
                    with self._cond:
                        self._busy -= 1
                        self._cond.notify_all()
        finally:
            http.close()

    def _post(self, http: httpx.Client, item: _Delivery) -> None:
        body, headers = simulator.signed(item.payload, item.secret)
        for attempt in range(3):
            try:
                response = http.post(item.url, content=body, headers=headers)
                if response.status_code == 200:
                    self.posted += 1
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2 * (attempt + 1))
        self.failed += 1
        log.warning("sandbox.webhook_failed")


class SandboxState:
    """One app's sandbox: its fault settings, its seeded draws and its webhook sender."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.faults = Faults.parse(settings.sandbox_faults)
        # Fault draws are reproducible from a seed; they protect nothing.
        self.rng = random.Random(settings.sandbox_seed)  # noqa: S311
        self.factory = factory
        self._lock = threading.Lock()
        self._secrets: dict[tuple[str, str], str] = {}
        self._channels: dict[str, str] = {}
        self.webhooks = WebhookSender()

    def secret(self, account: str, channel: str = "whatsapp") -> str | None:
        """The app secret that signs this account's webhooks (None: post none)."""
        with self._lock:
            if (channel, account) in self._secrets:
                return self._secrets[(channel, account)]
        try:
            with session_scope(self.factory) as session:
                secret = repository.app_secret_for_account(session, channel, account)
        except Exception as exc:  # noqa: BLE001  # a sandbox without a database posts no webhooks
            log.info("sandbox.webhooks_off", reason=type(exc).__name__)
            return None
        if secret is not None:
            with self._lock:
                self._secrets[(channel, account)] = secret
        return secret

    def app_id(self, account: str, channel: str) -> str | None:
        """Meta's id of the app that owns the account (named in Messenger echoes)."""
        try:
            with session_scope(self.factory) as session:
                return repository.app_id_for_account(session, channel, account)
        except Exception:  # noqa: BLE001  # no database: no app id
            return None

    def page_channel(self, account: str) -> str:
        """``messenger`` or ``instagram``: the channel of the account a page-style send names
        (Messenger when unknown, e.g. ``me``, or without a database)."""
        with self._lock:
            if account in self._channels:
                return self._channels[account]
        channel = "messenger"
        if account != "me":
            try:
                with session_scope(self.factory) as session:
                    found = repository.page_account_channel(session, account)
            except Exception:  # noqa: BLE001  # no database: Messenger
                found = None
            channel = found or channel
            with self._lock:
                self._channels[account] = channel
        return channel

    def draw(self) -> tuple[str | None, bool]:
        """(the fault of this send or None, whether its webhooks are dropped)."""
        with self._lock:
            roll, drop = self.rng.random(), self.rng.random()
        f = self.faults
        fault = None
        if roll < f.throttle:
            fault = "429"
        elif roll < f.throttle + f.server_error:
            fault = "500"
        elif roll < f.throttle + f.server_error + f.stall:
            fault = "stall"
        return fault, drop < f.drop_webhooks


_state_lock = threading.Lock()


def state_for(request: Request) -> SandboxState:
    with _state_lock:
        state: SandboxState | None = getattr(request.app.state, "sandbox", None)
        if state is None:
            state = SandboxState(request.app.state.settings, request.app.state.sessionmaker)
            request.app.state.sandbox = state
        return state


def _error(status: int, code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "OAuthException",
                "code": code,
                **extra,
                "fbtrace_id": secrets.token_hex(8),
            }
        },
        status_code=status,
    )


def _webhook_url(state: SandboxState, request: Request, channel: str) -> str:
    configured = state.settings.sandbox_webhook_url
    if configured:
        return configured.replace("{channel}", channel)
    return f"{str(request.base_url).rstrip('/')}/webhooks/{channel}"


def _schedule_statuses(
    state: SandboxState, request: Request, item: SentMessage, secret: str
) -> None:
    url = _webhook_url(state, request, "whatsapp")
    delay = state.settings.sandbox_webhook_delay
    now = int(time.time())
    for step, status in enumerate(("sent", "delivered")):
        payload = simulator.whatsapp_status(
            phone_number_id=item.account,
            message_id=item.id,
            status=status,
            recipient_id=item.to,
            callback_data=item.biz_opaque_callback_data,
            timestamp=now + step,
        )
        state.webhooks.schedule(url=url, secret=secret, payload=payload, delay=delay * (1 + step))


def echo_payload(
    item: SentMessage, *, app_id: str | None = None, timestamp_ms: int | None = None
) -> dict[str, Any]:
    """The ``is_echo`` webhook Meta posts for a Messenger or Instagram send: Messenger names the
    sending app (``app_id``) and returns ``metadata``; Instagram echoes carry neither."""
    ms = timestamp_ms if timestamp_ms is not None else int(item.at * 1000)
    message: dict[str, Any] = {"mid": item.id, "is_echo": True}
    if item.channel == "messenger":
        if app_id is not None:
            message["app_id"] = int(app_id) if app_id.isdigit() else app_id
        if item.metadata is not None:
            message["metadata"] = item.metadata
    message["text"] = item.text
    return {
        "object": "page" if item.channel == "messenger" else "instagram",
        "entry": [
            {
                "id": item.account,
                "time": ms,
                "messaging": [
                    {
                        "sender": {"id": item.account},
                        "recipient": {"id": item.to},
                        "timestamp": ms,
                        "message": message,
                    }
                ],
            }
        ],
    }


_MESSAGING_TYPES = frozenset({"RESPONSE", "UPDATE", "MESSAGE_TAG"})
_TAGS = frozenset(
    {
        "HUMAN_AGENT",
        "ACCOUNT_UPDATE",
        "CONFIRMED_EVENT_UPDATE",
        "CUSTOMER_FEEDBACK",
        "POST_PURCHASE_UPDATE",
    }
)
_SENDER_ACTIONS = frozenset({"mark_seen", "typing_on", "typing_off", "react", "unreact"})


def _fault_response(state: SandboxState, fault: str | None, *, page: bool) -> JSONResponse | None:
    if fault == "429":
        if page:
            response = _error(429, 613, "Calls to this api have exceeded the rate limit.")
        else:
            response = _error(
                429,
                130429,
                "(#130429) Rate limit hit",
                error_subcode=2494055,
                error_data={
                    "messaging_product": "whatsapp",
                    "details": "Cloud API message throughput has been reached.",
                },
            )
        response.headers["Retry-After"] = f"{state.faults.retry_after:g}"
        return response
    if fault == "500":
        if page:
            return _error(500, 2, "An unexpected error has occurred. Please retry your request.")
        return _error(500, 131000, "Something went wrong")
    return None


async def _page_send(account: str, body: dict[str, Any], request: Request) -> JSONResponse:
    """A Messenger or Instagram Send API request."""
    state = state_for(request)
    recipient = body.get("recipient")
    to = recipient.get("id") if isinstance(recipient, dict) else None
    if not isinstance(to, str) or not to:
        return _error(400, 100, "The parameter recipient is required")
    channel = await run_in_threadpool(state.page_channel, account)
    action = body.get("sender_action")
    if action is not None:
        if action not in _SENDER_ACTIONS or "message" in body:
            return _error(400, 100, "Invalid parameter sender_action")
        store.add_action(channel=channel, account=account, request=body)
        return JSONResponse({"recipient_id": to})
    message = body.get("message")
    text = message.get("text") if isinstance(message, dict) else None
    if not isinstance(text, str) or not text:
        return _error(400, 100, "Invalid parameter: message.text is required")
    messaging_type = body.get("messaging_type")
    if messaging_type not in _MESSAGING_TYPES:
        return _error(400, 100, "Invalid parameter: messaging_type is required")
    tag = body.get("tag")
    if (messaging_type == "MESSAGE_TAG") != (tag is not None) or (
        tag is not None and tag not in _TAGS
    ):
        return _error(400, 100, "Invalid parameter: tag goes with MESSAGE_TAG only")
    if channel == "instagram" and len(text.encode()) > 1000:
        return _error(400, 100, "Param message[text] must be at most 1000 bytes (UTF-8).")
    if channel == "messenger" and len(text) >= 2000:
        return _error(400, 100, "Param message[text] must be less than 2000 characters.")
    metadata = message.get("metadata") if isinstance(message, dict) else None
    if metadata is not None and (not isinstance(metadata, str) or len(metadata) >= 1000):
        return _error(400, 100, "Param message[metadata] must be less than 1000 characters")
    fault, drop = state.draw()
    refused = _fault_response(state, fault, page=True)
    if refused is not None:
        return refused
    item = store.add(
        account=account,
        to=to,
        text=text,
        fault=fault,
        channel=channel,
        messaging_type=messaging_type,
        tag=tag,
        metadata=metadata,
        request=body,
    )
    if state.settings.sandbox_webhooks and not drop and account != "me":
        secret = await run_in_threadpool(state.secret, account, channel)
        if secret is not None:
            app_id = await run_in_threadpool(state.app_id, account, channel)
            state.webhooks.schedule(
                url=_webhook_url(state, request, channel),
                secret=secret,
                payload=echo_payload(item, app_id=app_id),
                delay=state.settings.sandbox_webhook_delay,
            )
    if fault == "stall":
        await asyncio.sleep(state.settings.sandbox_stall_seconds)
    return JSONResponse({"recipient_id": to, "message_id": item.id})


def _whatsapp_content(body: dict[str, Any]) -> str | JSONResponse:
    """The text a WhatsApp send carries (a template as ``template:NAME``), or Meta's error.

    A template send needs ``template.name`` and ``template.language.code``; its components, when
    present, are a list of objects whose ``parameters`` are ``{"type": "text", "text": …}``. The
    sandbox does not know which templates are approved: the send lane checks that itself."""
    if body.get("type") == "template":
        template = body.get("template")
        language = template.get("language") if isinstance(template, dict) else None
        if (
            not isinstance(template, dict)
            or not isinstance(template.get("name"), str)
            or not template["name"]
            or not isinstance(language, dict)
            or not isinstance(language.get("code"), str)
            or not language["code"]
            or not _template_components_ok(template.get("components", []))
        ):
            return _error(400, 100, "Invalid parameter: template")
        return f"template:{template['name']}"
    text = body.get("text")
    if (
        body.get("type") != "text"
        or not isinstance(text, dict)
        or not isinstance(text.get("body"), str)
        or not text["body"]
    ):
        return _error(400, 100, "Invalid parameter")
    if len(text["body"]) > 4096:
        return _error(400, 100, "Param text['body'] must be at most 4096 characters long.")
    return str(text["body"])


def _template_components_ok(components: Any) -> bool:
    if not isinstance(components, list):
        return False
    for component in components:
        if not isinstance(component, dict) or not isinstance(component.get("type"), str):
            return False
        parameters = component.get("parameters", [])
        if not isinstance(parameters, list) or not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in parameters
        ):
            return False
    return True


@router.post("/graph/{version}/{account}/messages")
async def send_message(
    version: str,
    account: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    access_token: Annotated[str | None, Query()] = None,
) -> JSONResponse:
    """Accepts WhatsApp Cloud API text, template and read/typing requests, and
    Messenger/Instagram Send API text and sender-action requests; answers in Meta's success or
    error format."""
    bearer = bool(authorization and authorization.startswith("Bearer ") and len(authorization) > 7)
    if not bearer and not access_token:
        return _error(401, 190, "Invalid OAuth access token - Cannot parse access token")
    try:
        body: Any = await request.json()
    except ValueError:
        return _error(400, 100, "Invalid parameter: body is not JSON")
    if isinstance(body, dict) and "messaging_product" not in body and "recipient" in body:
        return await _page_send(account, body, request)
    if not bearer:
        return _error(401, 190, "Invalid OAuth access token - Cannot parse access token")
    if (
        isinstance(body, dict)
        and body.get("messaging_product") == "whatsapp"
        and body.get("status") == "read"
    ):
        indicator = body.get("typing_indicator")
        if not isinstance(body.get("message_id"), str) or (
            indicator is not None and indicator != {"type": "text"}
        ):
            return _error(400, 100, "Invalid parameter")
        store.add_action(channel="whatsapp", account=account, request=body)
        return JSONResponse({"success": True})
    if (
        not isinstance(body, dict)
        or body.get("messaging_product") != "whatsapp"
        or not isinstance(body.get("to"), str)
    ):
        return _error(400, 100, "Invalid parameter")
    content = _whatsapp_content(body)
    if isinstance(content, JSONResponse):
        return content
    callback = body.get("biz_opaque_callback_data")
    if callback is not None and (not isinstance(callback, str) or len(callback) > 512):
        return _error(400, 100, "Param biz_opaque_callback_data must be at most 512 characters")
    state = state_for(request)
    fault, drop = state.draw()
    refused = _fault_response(state, fault, page=False)
    if refused is not None:
        return refused
    item = store.add(
        account=account,
        to=body["to"],
        text=content,
        callback_data=callback,
        fault=fault,
        request=body,
    )
    if state.settings.sandbox_webhooks and not drop:
        secret = await run_in_threadpool(state.secret, account)
        if secret is not None:
            _schedule_statuses(state, request, item, secret)
    if fault == "stall":
        await asyncio.sleep(state.settings.sandbox_stall_seconds)
    return JSONResponse(
        {
            "messaging_product": "whatsapp",
            "contacts": [{"input": item.to, "wa_id": item.to}],
            "messages": [{"id": item.id}],
        }
    )


@router.get("/sent")
def sent(
    to: Annotated[str | None, Query()] = None, after: Annotated[int, Query(ge=0)] = 0
) -> dict[str, Any]:
    """Messages the sandbox accepted, oldest first; ``after`` is the last ``seq`` already seen."""
    return {"messages": [asdict(m) for m in store.since(to=to, after=after)]}
