"""``parley chat``: a terminal that behaves like WhatsApp, Messenger or Instagram.

It signs and posts webhooks exactly as Meta does (raw bytes with ``\\u`` escapes, signed with the
app secret, or for Instagram the app's Instagram secret when it has one), then prints the bot's
messages as they reach the sandbox Graph API, and their delivery state as the platform records it
from the sandbox's webhooks (WhatsApp ``statuses``, Messenger/Instagram echoes).
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from core.db import make_sessionmaker, session_scope
from core.models import ChannelAccount, MetaApp, OutboundChunk
from webhooks import simulator

CHANNELS = ("whatsapp", "messenger", "instagram")
CHANNEL_NAMES = {"whatsapp": "WhatsApp", "messenger": "Messenger", "instagram": "Instagram"}

HELP = """\
Type a message and press Enter. Commands:
  /image PATH    send an image. WhatsApp: an image message naming a made-up media id (the
                 bytes are not uploaded anywhere, so the bot cannot download them). Messenger/
                 Instagram: an image attachment whose URL is PATH when it is an http(s) URL,
                 else a made-up CDN URL (nothing is served there).
  /react EMOJI   react to the bot's last message (/react alone removes the reaction)
  /delete        delete your last message (WhatsApp revoke, Instagram unsend); Messenger has no
                 unsend, so nothing is sent there
  /stop          send STOP as text (on WhatsApp also a user_preferences "stop")
  /help          this text
  /quit          leave"""


@dataclass(frozen=True)
class ChatTarget:
    account: str  # phone_number_id, page id or Instagram account id
    app_secret: str  # the secret that signs this channel's webhooks
    channel: str = "whatsapp"

    @property
    def phone_number_id(self) -> str:
        return self.account


def find_target(account: str | None, channel: str = "whatsapp") -> ChatTarget:
    """The first account of ``channel`` (or the one with id ``account``) and its signing secret."""
    if channel not in CHANNELS:
        raise LookupError(f"unknown channel {channel!r}; use one of {', '.join(CHANNELS)}")
    with session_scope(make_sessionmaker()) as session:
        query = (
            select(ChannelAccount.external_id, MetaApp.app_secret, MetaApp.instagram_app_secret)
            .join(MetaApp, MetaApp.id == ChannelAccount.meta_app_id)
            .where(ChannelAccount.channel == channel)
            .order_by(ChannelAccount.id)
        )
        if account:
            query = query.where(ChannelAccount.external_id == account)
        row = session.execute(query).first()
    if row is None:
        raise LookupError(
            f"no {CHANNEL_NAMES[channel]} channel account found; apply a bots file first"
        )
    secret = row.app_secret
    if channel == "instagram" and row.instagram_app_secret:
        secret = row.instagram_app_secret
    return ChatTarget(row.external_id, secret, channel)


@dataclass
class BotMessage:
    id: str
    text: str
    state: str | None = None


# The states worth waiting for before the prompt comes back.
_SETTLED = {
    "whatsapp": frozenset({"delivered", "read", "failed", "dead"}),
    "messenger": frozenset({"sent", "delivered", "read", "failed", "dead"}),
    "instagram": frozenset({"sent", "delivered", "read", "failed", "dead"}),
}


class Chat:
    def __init__(
        self,
        api: str,
        target: ChatTarget,
        user: str,
        *,
        timeout: float = 120.0,
        http: httpx.Client | None = None,
        states: bool = True,
    ):
        self.api = api.rstrip("/")
        self.target = target
        self.channel = target.channel
        self.user = user
        self.timeout = timeout
        self.http = http or httpx.Client(timeout=10.0)
        self.track_states = states
        self.last_user_mid: str | None = None
        self.last_bot_mid: str | None = None
        self._pending: dict[str, BotMessage] = {}
        self.seen = self._last_seq()

    @property
    def wa_id(self) -> str:
        return self.user

    def _last_seq(self) -> int:
        response = self.http.get(f"{self.api}/sandbox/sent", params={"to": self.user})
        response.raise_for_status()
        messages = response.json()["messages"]
        return int(messages[-1]["seq"]) if messages else 0

    # --- posting, as Meta does ----------------------------------------------------------------

    def post(self, payload: dict[str, Any]) -> None:
        body, headers = simulator.signed(payload, self.target.app_secret)
        response = self.http.post(
            f"{self.api}/webhooks/{self.channel}", content=body, headers=headers
        )
        if response.status_code != 200:
            raise RuntimeError(f"webhook refused: {response.status_code} {response.text}")

    def send(self, text: str) -> None:
        mid = simulator.new_mid(self.channel)
        if self.channel == "whatsapp":
            payload = simulator.whatsapp_text(
                phone_number_id=self.target.account,
                wa_id=self.user,
                name="You",
                text=text,
                message_id=mid,
            )
        else:
            payload = simulator.page_text(
                channel=self.channel,
                account=self.target.account,
                user=self.user,
                text=text,
                mid=mid,
            )
        self.post(payload)
        self.last_user_mid = mid

    def send_image(self, path: str) -> None:
        mid = simulator.new_mid(self.channel)
        if self.channel == "whatsapp":
            data = Path(path).expanduser().read_bytes()
            mime = mimetypes.guess_type(path)[0] or "image/jpeg"
            payload = simulator.whatsapp_image(
                phone_number_id=self.target.account,
                wa_id=self.user,
                name="You",
                media_id=str(10**15 + secrets.randbelow(9 * 10**15)),
                sha256=base64.b64encode(hashlib.sha256(data).digest()).decode(),
                mime_type=mime,
                message_id=mid,
            )
        else:
            if path.startswith(("http://", "https://")):
                url = path
            else:
                name = Path(path).name or "image.jpg"
                url = f"https://scontent.xx.fbcdn.net/v/parley-chat/{secrets.token_hex(8)}/{name}"
            payload = simulator.page_attachment(
                channel=self.channel,
                account=self.target.account,
                user=self.user,
                url=url,
                kind="image",
                mid=mid,
            )
        self.post(payload)
        self.last_user_mid = mid

    def react(self, emoji: str) -> None:
        if self.last_bot_mid is None:
            raise RuntimeError("the bot has not sent anything to react to yet")
        if self.channel == "whatsapp":
            payload = simulator.whatsapp_reaction(
                phone_number_id=self.target.account,
                wa_id=self.user,
                name="You",
                target_message_id=self.last_bot_mid,
                emoji=emoji,
            )
        else:
            payload = simulator.page_reaction(
                channel=self.channel,
                account=self.target.account,
                user=self.user,
                target_mid=self.last_bot_mid,
                emoji=emoji or None,
            )
        self.post(payload)

    def delete(self) -> bool:
        """Delete the user's last message; False (nothing sent) on Messenger, which has none."""
        if self.channel == "messenger":
            return False
        if self.last_user_mid is None:
            raise RuntimeError("you have not sent anything to delete yet")
        if self.channel == "whatsapp":
            payload = simulator.whatsapp_revoke(
                phone_number_id=self.target.account,
                wa_id=self.user,
                name="You",
                original_message_id=self.last_user_mid,
            )
        else:
            payload = simulator.page_delete(
                channel=self.channel,
                account=self.target.account,
                user=self.user,
                mid=self.last_user_mid,
            )
        self.post(payload)
        self.last_user_mid = None
        return True

    def stop(self) -> None:
        self.send("STOP")
        if self.channel == "whatsapp":
            self.post(
                simulator.whatsapp_user_preferences(
                    phone_number_id=self.target.account, wa_id=self.user, value="stop"
                )
            )

    # --- what the bot sends -------------------------------------------------------------------

    def new_messages(self) -> list[BotMessage]:
        response = self.http.get(
            f"{self.api}/sandbox/sent", params={"to": self.user, "after": self.seen}
        )
        response.raise_for_status()
        messages = response.json()["messages"]
        if messages:
            self.seen = max(self.seen, max(int(m["seq"]) for m in messages))
        got = [BotMessage(str(m["id"]), str(m["text"])) for m in messages]
        for message in got:
            self.last_bot_mid = message.id
            if self.track_states:
                self._pending[message.id] = message
        return got

    def replies(self) -> list[str]:
        return [m.text for m in self.new_messages()]

    def listen(
        self, *, expect_reply: bool = True, settle: float = 2.0, quiet: float = 3.0
    ) -> list[BotMessage]:
        """Everything the bot sends for one event: a notice (e.g. the AI disclosure) may come
        first, so keep listening until ``settle`` seconds pass without anything new. When no
        reply is expected, listen for ``quiet`` seconds and return what came (maybe nothing)."""
        deadline = time.monotonic() + (self.timeout if expect_reply else quiet)
        got: list[BotMessage] = []
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            new = self.new_messages()
            if new:
                got.extend(new)
                quiet_since = time.monotonic()
            elif got and time.monotonic() - quiet_since >= settle:
                return got
            time.sleep(0.3)
        if got or not expect_reply:
            return got
        raise TimeoutError(f"no reply within {self.timeout:.0f} s")

    def wait_reply(self, settle: float = 2.0) -> list[str]:
        return [m.text for m in self.listen(settle=settle)]

    def delivery_states(self) -> list[BotMessage]:
        """Bot messages whose recorded delivery state changed since last asked."""
        pending = self._pending
        if not pending:
            return []
        try:
            with session_scope(make_sessionmaker()) as session:
                rows = session.execute(
                    select(
                        OutboundChunk.provider_message_id,
                        OutboundChunk.state,
                        OutboundChunk.delivery,
                    ).where(
                        OutboundChunk.channel == self.channel,
                        OutboundChunk.provider_message_id.in_(list(pending)),
                    )
                ).all()
        except Exception:  # noqa: BLE001  # no database at hand: no delivery states
            self.track_states = False
            pending.clear()
            return []
        changed: list[BotMessage] = []
        for mid, state, delivery in rows:
            message = pending.get(mid or "")
            now = delivery or state
            if message is None or now == message.state:
                continue
            message.state = now
            changed.append(message)
            if now in _SETTLED[self.channel]:
                del pending[message.id]
        return changed

    def wait_states(self, timeout: float = 3.0) -> list[BotMessage]:
        """Delivery states as they are recorded, until every shown message has settled."""
        deadline = time.monotonic() + timeout
        got: list[BotMessage] = []
        while self._pending and time.monotonic() < deadline:
            got.extend(self.delivery_states())
            if self._pending:
                time.sleep(0.25)
        self._pending.clear()
        return got


def new_user_id(channel: str = "whatsapp") -> str:
    """A made-up wa_id (WhatsApp) or page-scoped / Instagram-scoped user id."""
    if channel == "whatsapp":
        return "1555" + "".join(secrets.choice("0123456789") for _ in range(7))
    return str(10**15 + secrets.randbelow(9 * 10**15))


def new_wa_id() -> str:
    return new_user_id("whatsapp")


def _short(text: str, limit: int = 40) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def handle(chat: Chat, text: str, out: Callable[[str], None]) -> bool:
    """One line typed by the user; False when the user asked to leave."""
    command, _, arg = text.partition(" ")
    arg = arg.strip()
    expect_reply = True
    if command in ("/quit", "/exit"):
        return False
    if command == "/help":
        out(HELP)
        return True
    if command == "/image":
        if not arg:
            out("usage: /image PATH")
            return True
        chat.send_image(arg)
    elif command == "/react":
        chat.react(arg)
        expect_reply = False
    elif command == "/delete":
        if not chat.delete():
            out("Messenger has no unsend: nothing was sent")
            return True
        expect_reply = False
    elif command == "/stop":
        chat.stop()
        expect_reply = False
    elif command.startswith("/") and " " not in command and len(command) > 1:
        out(f"unknown command {command}; /help lists them")
        return True
    else:
        chat.send(text)
    for message in chat.listen(expect_reply=expect_reply):
        out(f"bot> {message.text}")
    if chat.track_states:
        for message in chat.wait_states():
            out(f"  [{message.state}] {_short(message.text)}")
    return True


def run_chat(chat: Chat, lines: Iterable[str], out: Callable[[str], None]) -> None:
    for line in lines:
        text = line.strip()
        if not text:
            continue
        try:
            if not handle(chat, text, out):
                return
        except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
            out(f"error: {exc}")
