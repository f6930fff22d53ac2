"""Cached Meta apps and channel-account routes for the webhook hot path.

Every webhook needs the Meta apps' secrets (to check its signature) and the channel account it is
addressed to (to route it). Both change rarely, so they are read from Postgres at most once per
``ttl`` seconds (``PARLEY_ROUTING_CACHE_SECONDS``, default 5) instead of once per request, and the
secrets are decrypted once per read instead of once per request.

Staleness is bounded and safe:

- a signature that no cached secret matches re-reads the apps at once (at most once per second,
  so a flood of forged requests cannot turn into a flood of queries), so a new or rotated secret
  works on its first webhook;
- a route that is not cached is read at once; a cached route may be up to ``ttl`` old, so a bot
  change applied with ``parley bots apply`` reaches new conversations within ``ttl`` seconds;
- the conversation of a contact with an account is remembered once known (conversations are
  created once and only disappear when erased);
- a cached route or conversation that has since been deleted makes the group commit fail a
  foreign key; the caches are then dropped and the batch is applied delivery by delivery
  without them (:mod:`webhooks.batcher`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_scope
from core.models import ChannelAccount
from webhooks import repository

FORCED_REFRESH_EVERY = 1.0  # seconds between re-reads forced by unknown signatures
THREADS_KEPT = 100_000  # conversations remembered (least recently used go first)


@dataclass(frozen=True)
class Route:
    """What the intake needs of a channel account (no secrets)."""

    id: int
    workspace_id: int
    bot_id: int
    meta_app_id: int
    channel: str


class Directory:
    """Thread-safe: the event loop reads the apps, the intake writer thread reads the routes."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory
        self.ttl = max(0.0, ttl)
        self.clock = clock
        self._lock = threading.Lock()
        self._apps: list[repository.AppSecrets] = []
        self._apps_at: float | None = None
        self._forced_at: float | None = None
        self._routes: dict[tuple[str, str], tuple[Route | None, float]] = {}
        self._threads: OrderedDict[tuple[int, str], int] = OrderedDict()

    # --- Meta apps

    def apps_fresh(self) -> bool:
        """True while the cached apps may be used without reading Postgres."""
        with self._lock:
            return self._apps_at is not None and self.clock() - self._apps_at < self.ttl

    def apps(self) -> list[repository.AppSecrets]:
        """The Meta apps, read again when older than ``ttl`` (blocking: call it off the event
        loop when :meth:`apps_fresh` is False)."""
        if self.apps_fresh():
            with self._lock:
                return self._apps
        return self._read_apps()

    def may_force(self) -> bool:
        """Whether an unknown signature may re-read the apps now (rate-limited)."""
        with self._lock:
            now = self.clock()
            if self._forced_at is not None and now - self._forced_at < FORCED_REFRESH_EVERY:
                return False
            self._forced_at = now
            return True

    def refresh_apps(self) -> list[repository.AppSecrets]:
        return self._read_apps()

    def _read_apps(self) -> list[repository.AppSecrets]:
        with session_scope(self.factory) as session:
            apps = repository.meta_apps(session)
        with self._lock:
            self._apps, self._apps_at = apps, self.clock()
        return apps

    # --- routes

    def routes(self, session: Session, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Route]:
        """The routes of ``(channel, external_id)`` keys that have an account (one query for the
        keys not cached or older than ``ttl``)."""
        now = self.clock()
        found: dict[tuple[str, str], Route] = {}
        missing: set[tuple[str, str]] = set()
        with self._lock:
            for key in keys:
                cached = self._routes.get(key)
                if cached is None or now - cached[1] >= self.ttl:
                    missing.add(key)
                elif cached[0] is not None:
                    found[key] = cached[0]
        if missing:
            read = _read_routes(session, missing)
            with self._lock:
                for key in missing:
                    self._routes[key] = (read.get(key), now)
            found.update(read)
        return found

    def forget(self) -> None:
        """Drop the cached routes and conversations (after a batch failed)."""
        with self._lock:
            self._routes.clear()
            self._threads.clear()

    # --- conversations

    def conversations(self, keys: Iterable[tuple[int, str]]) -> dict[tuple[int, str], int]:
        """The remembered conversation ids of ``(account id, contact)`` keys."""
        found: dict[tuple[int, str], int] = {}
        with self._lock:
            for key in keys:
                conversation = self._threads.get(key)
                if conversation is not None:
                    self._threads.move_to_end(key)
                    found[key] = conversation
        return found

    def remember(self, conversations: dict[tuple[int, str], int]) -> None:
        with self._lock:
            self._threads.update(conversations)
            while len(self._threads) > THREADS_KEPT:
                self._threads.popitem(last=False)


def _read_routes(session: Session, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Route]:
    by_channel: dict[str, list[str]] = {}
    for channel, external_id in keys:
        by_channel.setdefault(channel, []).append(external_id)
    found: dict[tuple[str, str], Route] = {}
    for channel, ids in by_channel.items():
        rows = session.execute(
            select(
                ChannelAccount.id,
                ChannelAccount.workspace_id,
                ChannelAccount.bot_id,
                ChannelAccount.meta_app_id,
                ChannelAccount.channel,
                ChannelAccount.external_id,
            ).where(ChannelAccount.channel == channel, ChannelAccount.external_id.in_(ids))
        ).all()
        for r in rows:
            found[(r.channel, r.external_id)] = Route(
                r.id, r.workspace_id, r.bot_id, r.meta_app_id, r.channel
            )
    return found
