"""``parley chat``: a terminal that behaves like WhatsApp.

It signs and posts webhooks exactly as Meta does, then prints the bot's replies as they reach the
sandbox Graph API.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx
from sqlalchemy import select

from core.db import make_sessionmaker, session_scope
from core.models import ChannelAccount, MetaApp
from webhooks import simulator


@dataclass(frozen=True)
class ChatTarget:
    phone_number_id: str
    app_secret: str


def find_target(phone_number_id: str | None) -> ChatTarget:
    with session_scope(make_sessionmaker()) as session:
        query = (
            select(ChannelAccount.external_id, MetaApp.app_secret)
            .join(MetaApp, MetaApp.id == ChannelAccount.meta_app_id)
            .where(ChannelAccount.channel == "whatsapp")
            .order_by(ChannelAccount.id)
        )
        if phone_number_id:
            query = query.where(ChannelAccount.external_id == phone_number_id)
        row = session.execute(query).first()
    if row is None:
        raise LookupError("no WhatsApp channel account found; apply a bots file first")
    return ChatTarget(row.external_id, row.app_secret)


class Chat:
    def __init__(self, api: str, target: ChatTarget, wa_id: str, *, timeout: float = 120.0):
        self.api = api.rstrip("/")
        self.target = target
        self.wa_id = wa_id
        self.timeout = timeout
        self.http = httpx.Client(timeout=10.0)
        self.seen = self._last_seq()

    def _last_seq(self) -> int:
        response = self.http.get(f"{self.api}/sandbox/sent", params={"to": self.wa_id})
        response.raise_for_status()
        messages = response.json()["messages"]
        return int(messages[-1]["seq"]) if messages else 0

    def send(self, text: str) -> None:
        payload = simulator.whatsapp_text(
            phone_number_id=self.target.phone_number_id, wa_id=self.wa_id, text=text, name="You"
        )
        body, headers = simulator.signed(payload, self.target.app_secret)
        response = self.http.post(f"{self.api}/webhooks/whatsapp", content=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"webhook refused: {response.status_code} {response.text}")

    def replies(self) -> list[str]:
        response = self.http.get(
            f"{self.api}/sandbox/sent", params={"to": self.wa_id, "after": self.seen}
        )
        response.raise_for_status()
        messages = response.json()["messages"]
        if messages:
            self.seen = max(self.seen, max(int(m["seq"]) for m in messages))
        return [str(m["text"]) for m in messages]

    def wait_reply(self, settle: float = 2.0) -> list[str]:
        """Everything the bot sends for one message: a notice (e.g. the AI disclosure) may come
        first, so keep listening until ``settle`` seconds pass without anything new."""
        deadline = time.monotonic() + self.timeout
        got: list[str] = []
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            new = self.replies()
            if new:
                got.extend(new)
                quiet_since = time.monotonic()
            elif got and time.monotonic() - quiet_since >= settle:
                return got
            time.sleep(0.3)
        if got:
            return got
        raise TimeoutError(f"no reply within {self.timeout:.0f} s")


def new_wa_id() -> str:
    return "1555" + "".join(secrets.choice("0123456789") for _ in range(7))


def run_chat(chat: Chat, lines: Iterable[str], out: Callable[[str], None]) -> None:
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        try:
            chat.send(text)
            for reply in chat.wait_reply():
                out(f"bot> {reply}")
        except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
            out(f"error: {exc}")
