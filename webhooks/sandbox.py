"""A sandbox Graph API for development: it answers sends the way Meta does and keeps them, per
recipient, for ``parley chat`` and the tests to read. Never mounted in production."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse

router = APIRouter(prefix="/sandbox", tags=["sandbox"])


@dataclass(frozen=True)
class SentMessage:
    seq: int
    id: str
    account: str
    to: str
    text: str
    at: float


class SandboxStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: list[SentMessage] = []

    def add(self, *, account: str, to: str, text: str) -> SentMessage:
        with self._lock:
            wamid = "wamid.SANDBOX" + secrets.token_hex(12).upper()
            item = SentMessage(len(self._sent) + 1, wamid, account, to, text, time.time())
            self._sent.append(item)
            return item

    def since(self, *, to: str | None, after: int) -> list[SentMessage]:
        with self._lock:
            return [m for m in self._sent[after:] if to is None or m.to == to]


store = SandboxStore()


def _error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "OAuthException",
                "code": code,
                "fbtrace_id": secrets.token_hex(8),
            }
        },
        status_code=status,
    )


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
    item = store.add(account=account, to=body["to"], text=text["body"])
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
