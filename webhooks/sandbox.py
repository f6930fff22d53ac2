"""A sandbox Graph API for development: it answers sends the way Meta does, keeps them, per
recipient, for ``parley chat`` and the tests to read, and reports on them the way Meta does.
Never mounted in production.

For each accepted WhatsApp send it posts signed ``statuses`` webhooks (``sent``, then
``delivered``) carrying the send's ``biz_opaque_callback_data`` to this API's
``/webhooks/whatsapp`` (or ``PARLEY_SANDBOX_WEBHOOK_URL``) after ``PARLEY_SANDBOX_WEBHOOK_DELAY``
seconds, from a background thread that never holds up the send's answer. They are signed with the
secret of the Meta app that owns the phone number, read from the database.

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


class SandboxStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: list[SentMessage] = []

    def add(
        self,
        *,
        account: str,
        to: str,
        text: str,
        callback_data: str | None = None,
        fault: str | None = None,
    ) -> SentMessage:
        with self._lock:
            wamid = "wamid.SANDBOX" + secrets.token_hex(12).upper()
            seq = len(self._sent) + 1
            item = SentMessage(
                seq=seq,
                id=wamid,
                account=account,
                to=to,
                text=text,
                at=time.time(),
                biz_opaque_callback_data=callback_data,
                order=seq,
                fault=fault,
            )
            self._sent.append(item)
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
        self._secrets: dict[str, str] = {}
        self.webhooks = WebhookSender()

    def secret(self, account: str) -> str | None:
        """The app secret that signs this phone number's webhooks (None: post none)."""
        with self._lock:
            if account in self._secrets:
                return self._secrets[account]
        try:
            with session_scope(self.factory) as session:
                secret = repository.app_secret_for_account(session, "whatsapp", account)
        except Exception as exc:  # noqa: BLE001  # a sandbox without a database posts no webhooks
            log.info("sandbox.webhooks_off", reason=type(exc).__name__)
            return None
        if secret is not None:
            with self._lock:
                self._secrets[account] = secret
        return secret

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


def _schedule_statuses(
    state: SandboxState, request: Request, item: SentMessage, secret: str
) -> None:
    url = (
        state.settings.sandbox_webhook_url
        or f"{str(request.base_url).rstrip('/')}/webhooks/whatsapp"
    )
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


@router.post("/graph/{version}/{account}/messages")
async def send_message(
    version: str,
    account: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Accepts WhatsApp Cloud API text sends; answers in Meta's success or error format."""
    if not authorization or not authorization.startswith("Bearer ") or len(authorization) < 8:
        return _error(401, 190, "Invalid OAuth access token - Cannot parse access token")
    try:
        body: Any = await request.json()
    except ValueError:
        return _error(400, 100, "Invalid parameter: body is not JSON")
    text = body.get("text") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or body.get("messaging_product") != "whatsapp"
        or not isinstance(body.get("to"), str)
        or body.get("type") != "text"
        or not isinstance(text, dict)
        or not isinstance(text.get("body"), str)
        or not text["body"]
    ):
        return _error(400, 100, "Invalid parameter")
    if len(text["body"]) > 4096:
        return _error(400, 100, "Param text['body'] must be at most 4096 characters long.")
    callback = body.get("biz_opaque_callback_data")
    if callback is not None and (not isinstance(callback, str) or len(callback) > 512):
        return _error(400, 100, "Param biz_opaque_callback_data must be at most 512 characters")
    state = state_for(request)
    fault, drop = state.draw()
    if fault == "429":
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
        return _error(500, 131000, "Something went wrong")
    item = store.add(
        account=account, to=body["to"], text=text["body"], callback_data=callback, fault=fault
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
